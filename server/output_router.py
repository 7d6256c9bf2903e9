"""The event loop's end of the engine's output channel.

The scheduler's thread hands each list of Output records to `put`, whose one
`call_soon_threadsafe` is the only way its thread reaches the event loop. On the
loop, each record goes to the queue of the request it names, if that request's
caller is still listening (a caller that left has closed its queue; its records
are dropped).
"""

from __future__ import annotations

import asyncio
import logging

from server.engine.outputs import Output

log = logging.getLogger(__name__)


class OutputRouter:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queues: dict[int, asyncio.Queue[Output]] = {}

    def put(self, outputs: list[Output]) -> None:
        """The scheduler's thread: forward `outputs` to the loop; never blocks."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, outputs)
        except RuntimeError:  # the loop is closed: nobody is left to read them
            log.debug("dropped %d output records: the event loop is closed", len(outputs))

    def open(self, request_id: int) -> asyncio.Queue[Output]:
        """On the loop: the queue that this request's records will arrive in."""
        queue: asyncio.Queue[Output] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def close(self, request_id: int) -> None:
        self._queues.pop(request_id, None)

    def is_open(self, request_id: int) -> bool:
        return request_id in self._queues

    def listening(self) -> int:
        return len(self._queues)

    def _deliver(self, outputs: list[Output]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
