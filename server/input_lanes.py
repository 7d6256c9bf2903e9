"""Where requests are prepared (task lookup, rendering, tokenization): worker
threads, off the event loop. Long inputs share one lane and are prepared one at
a time, so that a flood of them (refused or not) keeps at most one core busy
tokenizing, and ordinary requests never wait behind them: the lane's input is
tokenized in a process of its own at the lowest CPU priority
(server/tokenizer_process.py), so the model's threads, which compute ordinary
requests, get the cores first, and the lane holds no lock (nor the GIL) that
they need meanwhile. Under a load that keeps every core busy, a long input
waits. A request that waits for the long lane longer than the request
timeout is answered 504."""

from __future__ import annotations

from functools import partial

import anyio

from ptcore.errors import DeadlineExceeded

LONG_INPUT_CHARS = 4096  # about a thousand tokens of English: far above an ordinary request


def input_chars(fields: dict[str, str]) -> int:
    """A request's input size before tokenizing: the characters of its field values."""
    return sum(len(value) for value in fields.values())


def long_input(chars: int) -> bool:
    """Whether a request of `chars` characters (input_chars, and a hand-written prompt's) takes the long lane."""
    return chars > LONG_INPUT_CHARS


class InputLanes:
    def __init__(self, wait_s: float):
        self.long = anyio.Lock()  # held while a long input is prepared
        self.wait_s = wait_s  # the longest a long input waits for its lane

    async def prepare(self, prepare_fn, chars: int, *args):
        """prepare_fn(*args) in a worker thread; in the long lane when the request
        holds more than LONG_INPUT_CHARS characters (`chars`: its fields', and
        a hand-written prompt's words)."""
        call = partial(prepare_fn, *args)
        if not long_input(chars):
            return await anyio.to_thread.run_sync(call)
        with anyio.move_on_after(self.wait_s) as waited:
            await self.long.acquire()
        if waited.cancelled_caught:
            raise DeadlineExceeded(f"waited {self.wait_s:g} s for a turn to prepare a long input")
        try:
            return await anyio.to_thread.run_sync(call)
        finally:
            self.long.release()
