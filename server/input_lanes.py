"""Where requests are prepared (task lookup, rendering, tokenization): worker
threads, off the event loop. Long inputs share one lane and are prepared one at
a time, so that a flood of them (refused or not) keeps at most one core busy
tokenizing, and ordinary requests never wait behind them."""

from __future__ import annotations

from functools import partial

import anyio

LONG_INPUT_CHARS = 4096  # about a thousand tokens of English: far above an ordinary request


class InputLanes:
    def __init__(self):
        self.long = anyio.CapacityLimiter(1)

    async def prepare(self, prepare_fn, task_id: str, fields: dict[str, str], *more):
        """prepare_fn(task_id, fields, *more) in a worker thread; in the long lane
        when the fields hold more than LONG_INPUT_CHARS characters."""
        long = sum(len(value) for value in fields.values()) > LONG_INPUT_CHARS
        call = partial(prepare_fn, task_id, fields, *more)
        return await anyio.to_thread.run_sync(call, limiter=self.long if long else None)
