"""Which thread computes with several CPU cores: the one that runs the model.

PyTorch's CPU operators run on OpenMP (GNU libgomp in PyTorch's Linux
wheels). Each thread that runs a multi-threaded operator gets a team of
worker threads of its own, kept until that thread exits, and the main
thread never exits. Once a process holds more of these threads than it has
CPUs, libgomp stops letting idle workers spin between operators: they sleep,
and each of a decode step's ~950 operators then waits for them to wake.

Measured on the default model, 32 rows, a 2-core VM: a decode step on the
scheduler's thread took 99 ms while the thread that had loaded the model
still held its team, and 81 ms (what the same step takes on the main thread)
when no other thread held one. Through HTTP, the server ran at 212 tokens/s
until the thread that built the engine had idled out, and at 286 after
(`python -m bench.cpu_anchor`, its first round against the next two).

So the thread that builds the engine, and the main thread of `ptserve
serve`, compute on one thread (`serial`); the scheduler's thread takes the
configured number (`use`), and every thread that starts computing after that
computes on one: the server's worker threads, which prepare requests, check
uploads and build a fine-tuning job's trainer, live as long as the server is
busy, and a team one of them made stayed with it. Building a trainer on a
worker thread once slowed every decode step by a third (70 -> 87 ms at 16
rows) for as long as the job ran.
"""

from __future__ import annotations

import threading

import torch

# torch's own default, taken before anything here changes it: one per core,
# or what OMP_NUM_THREADS says
DEFAULT = torch.get_num_threads()


def resolve(threads: int) -> int:
    """The model's thread count for a `cpu_threads` setting (0: torch's default)."""
    return threads or DEFAULT


def serial() -> None:
    """From now on, this thread computes on one CPU thread. Call it before the
    thread runs a multi-threaded operator: a team once made stays."""
    _set(1)


def use(threads: int) -> None:
    """This thread computes on `threads` CPU threads (the model's thread); a
    thread that starts computing after this call computes on one."""
    _set(threads)
    # torch's count is process-wide until a thread first computes, and setting it
    # also sets the caller's own: set it on a helper thread, which leaves this
    # thread's count (pinned above) as it is
    helper = threading.Thread(target=serial, name="cpu-threads-serial")
    helper.start()
    helper.join()


def on_thread(threads: int, fn):
    """fn()'s result (or its exception), computed on a new thread of its own
    that uses `threads` CPU threads and ends when fn returns, taking its team
    with it. For work that must run with the model's thread count but not on
    the model's thread: MKL packs a weight for the thread count of the thread
    that packs it (server/engine/models/cpu_linear.py), and torch.compile
    compiles again for a thread whose count differs from the one it compiled on."""
    out: list = []

    def run():
        try:
            use(threads)
            out.append((True, fn()))
        except BaseException as e:  # handed to the caller
            out.append((False, e))

    worker = threading.Thread(target=run, name="cpu-threads-work")
    worker.start()
    worker.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


def _set(n: int) -> None:
    torch.set_num_threads(n)
    # torch applies its process-wide count to a thread the first time that thread
    # asks for it; asking now pins this thread's count to n, whatever a later
    # call elsewhere sets
    torch.get_num_threads()
