"""Where requests are prepared (task lookup, rendering, tokenization): worker
threads, off the event loop. Long inputs share one lane and are prepared one at
a time, so that a flood of them (refused or not) keeps at most one core busy
tokenizing, and ordinary requests never wait behind them:
- the lane is one thread of its own, at the lowest CPU priority (Linux's
  SCHED_IDLE: it runs only on a core nothing else wants), so the model's
  threads, which compute ordinary requests, get the cores first; under a load
  that keeps every core busy, a long input waits (up to the request timeout);
- it tokenizes on a tokenizer of its own (server/inference.py), so it holds no
  lock an ordinary request takes (at its priority, that would be a priority
  inversion).
A request that waits for the long lane longer than the request timeout is
answered 504."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import anyio

from ptcore.errors import DeadlineExceeded

LONG_INPUT_CHARS = 4096  # about a thousand tokens of English: far above an ordinary request
log = logging.getLogger(__name__)


def input_chars(fields: dict[str, str]) -> int:
    """A request's input size before tokenizing: the characters of its field values."""
    return sum(len(value) for value in fields.values())


def long_input(chars: int) -> bool:
    """Whether a request of `chars` characters (input_chars, and a hand-written prompt's) takes the long lane."""
    return chars > LONG_INPUT_CHARS


def _lowest_priority() -> None:
    """Run the calling thread under SCHED_IDLE at nice 19 (Linux: a thread's own
    policy and priority, which anyone may lower); elsewhere, as it is."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError) as e:
        log.info("the long-input lane runs at normal priority: %s", e)


class InputLanes:
    def __init__(self, wait_s: float):
        self.long = anyio.Lock()  # held while a long input is prepared
        self.wait_s = wait_s  # the longest a long input waits for its lane
        self._long_thread = ThreadPoolExecutor(1, "ptserve-long-input", initializer=_lowest_priority)

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
            return await asyncio.get_running_loop().run_in_executor(self._long_thread, call)
        finally:
            self.long.release()
