"""Waiting for work on behalf of an HTTP client.

A request stops being worth computing when its deadline passes or its client
goes away; then its work is abandoned: dropped if still queued (the future is
cancelled), or its row retired at the engine's next step, freeing its slot.
"""

from __future__ import annotations

import asyncio

from prompt_store.errors import Abandoned, DeadlineExceeded

POLL_S = 0.2  # how often a waiting request checks whether its client is still there


class ClientWait:
    def __init__(self, request, work, future: asyncio.Future, timeout: float):
        self.request = request
        self.work = work
        self.future = future
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + timeout

    def remaining(self) -> float:
        return self.deadline - self.loop.time()

    async def reason_to_stop(self) -> Exception | None:
        """DeadlineExceeded or Abandoned when the work is no longer wanted, else None."""
        if self.remaining() <= 0:
            return DeadlineExceeded(f"the request did not finish within {self.timeout:g} s")
        if await self.request.is_disconnected():
            return Abandoned("the client went away")
        return None

    def abandon(self) -> None:
        self.work.abandoned = True
        self.future.cancel()  # still queued: it never runs


async def wait_for_result(request, engine, work):
    """Submit `work` and wait for its result, abandoning it if the client leaves
    or the deadline passes (raising Abandoned / DeadlineExceeded)."""
    future = asyncio.wrap_future(engine.inference.submit(work))
    wait = ClientWait(request, work, future, engine.settings.request_timeout_s)
    while not future.done():
        await asyncio.wait({future}, timeout=max(0.0, min(POLL_S, wait.remaining())))
        if future.done():
            break
        stop = await wait.reason_to_stop()
        if stop is not None:
            wait.abandon()
            raise stop
    return future.result()
