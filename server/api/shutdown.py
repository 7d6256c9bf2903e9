"""Shutting down with a deadline: uvicorn's server, with a drain before its own shutdown.

uvicorn alone, on SIGTERM, waits for every running and queued request, however
long (PTSERVE_REQUEST_TIMEOUT_S is 300 s), while the platform kills the process
after its own grace (Docker: 10 s unless `stop_grace_period`; k8s:
`terminationGracePeriodSeconds`). Clients were then cut off: a stream that had its
200 ended with no error event, a plain request got no bytes.

Here the first SIGTERM (or SIGINT) drains instead:
1. at once, `/ready` answers 503 (load balancers stop sending) and every new
   request except `/health`, `/metrics` and `/v1/stats` gets 503 "server is
   shutting down" (server/api/request_gate.py);
2. requests already queued or running may finish, for at most
   PTSERVE_SHUTDOWN_GRACE_S (set it below the platform's grace);
3. then the engine stops: each request still queued or running gets its error
   (a stream its error event, a waiting request a 503 body), and
   uvicorn shuts down as usual, with nothing left to wait for.
A second signal ends the grace at once (step 3 now); later ones are uvicorn's
own (a repeated SIGINT exits without waiting for anything).
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn

log = logging.getLogger(__name__)
POLL_S = 0.05  # how often the drain looks whether the engine has finished its requests


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, grace_s: float):
        super().__init__(config)
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._grace_over = asyncio.Event()  # a second signal
        self._tasks: set[asyncio.Task] = set()  # the drain's task, kept from the garbage collector

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        """Signal handler (main thread, which runs the event loop)."""
        engine = getattr(self.config.app.state, "engine", None)
        if engine is None or self._loop is None or self._grace_over.is_set():
            return super().handle_exit(sig, frame)  # no engine yet, or a third signal: uvicorn's way
        if self._draining:
            self._loop.call_soon_threadsafe(self._grace_over.set)
            return
        self._draining = True
        self._captured_signals.append(sig)  # re-raised after shutdown, as uvicorn does
        self._loop.call_soon_threadsafe(self._start_drain, engine)

    def _start_drain(self, engine) -> None:
        task = asyncio.ensure_future(self._drain_then_exit(engine))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain_then_exit(self, engine) -> None:
        engine.drain()
        log.info("shutting down: new requests get 503; running requests may finish within %g s", self.grace_s)
        deadline = self._loop.time() + self.grace_s
        while engine.busy() and self._loop.time() < deadline and not self._grace_over.is_set():
            await asyncio.sleep(POLL_S)
        if engine.busy():
            log.warning("shutting down: the grace is over; failing the requests still running")
        try:
            # on the event loop, as the lifespan's own stop (the jobs' tasks are cancelled there); it waits
            # for the forward pass in progress, then answers what is left with "server is shutting down"
            engine.stop()
        finally:
            self.should_exit = True
