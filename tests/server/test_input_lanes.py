"""The long-input lane: one thread of its own, at the lowest CPU priority, so that
the model's threads get the cores before a long input's tokenizing (Linux: a
thread's own scheduling policy, SCHED_IDLE, and nice value)."""

import os
import threading

import anyio

from server.input_lanes import LONG_INPUT_CHARS, InputLanes


def priority_here() -> tuple[int, int, int]:
    """(the calling thread's scheduling policy, its nice value, its native id)."""
    tid = threading.get_native_id()
    return os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid), tid


def test_long_inputs_are_prepared_on_one_thread_at_the_lowest_priority():
    lanes = InputLanes(wait_s=10)
    base = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)

    async def main():
        long = [await lanes.prepare(priority_here, LONG_INPUT_CHARS + 1) for _ in range(3)]
        short = await lanes.prepare(priority_here, LONG_INPUT_CHARS)
        return long, short

    long, short = anyio.run(main)
    assert [(policy, nice) for policy, nice, _ in long] == [(os.SCHED_IDLE, 19)] * 3
    assert len({tid for _, _, tid in long}) == 1  # one thread
    assert short[:2] == base and short[2] != long[0][2]
