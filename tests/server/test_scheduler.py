"""The scheduler's batching loop, driven with a fake runner (no model)."""

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import pytest

from prompt_store.errors import ServiceUnavailable
from server.engine.scheduler import BatchStats, Scheduler


@dataclass
class FakePrompt:
    task_id: str
    version: int = 1


@dataclass(eq=False)
class FakeWork:
    kind: str
    prompt: FakePrompt
    steps: int = 1
    future: Future = field(default_factory=Future)
    submitted_at: float = field(default_factory=time.monotonic)


class FakeRunner:
    """Generate: finishes row i after works[i].steps steps; records batches."""

    def __init__(self):
        self.batches = []
        self.gate = threading.Event()
        self.gate.set()

    def generate(self, works, on_finish):
        self.batches.append([w.kind for w in works])
        self.gate.wait()
        for step in range(1, max(w.steps for w in works) + 1):
            for i, w in enumerate(works):
                if w.steps == step:
                    on_finish(i, f"{w.prompt.task_id}:{step}")
            time.sleep(0.01)

    def classify(self, works):
        self.batches.append([w.kind for w in works])
        return [w.prompt.task_id for w in works]


def scheduler(runner, max_batch_size=8, max_wait_s=0.05):
    s = Scheduler(runner, max_batch_size, max_wait_s, BatchStats())
    s.start()
    return s


def test_kinds_are_batched_apart_and_sizes_bounded():
    runner = FakeRunner()
    runner.gate.clear()
    s = scheduler(runner, max_batch_size=3)
    blocker = s.submit(FakeWork("generate", FakePrompt("first")))
    time.sleep(0.1)  # the worker is now busy with `blocker`
    works = [FakeWork("generate" if i % 2 else "classify", FakePrompt(f"t{i}")) for i in range(8)]
    futures = [s.submit(w) for w in works]
    runner.gate.set()
    assert [f.result(timeout=5) for f in futures] == [f"t{i}" if i % 2 == 0 else f"t{i}:1" for i in range(8)]
    assert blocker.result(timeout=5) == "first:1"
    s.stop()
    assert all(len(set(b)) == 1 and len(b) <= 3 for b in runner.batches)
    assert s.stats.snapshot()["requests"] == 9


def test_a_short_request_is_answered_before_the_long_one_in_its_batch_ends():
    s = scheduler(FakeRunner())
    long = FakeWork("generate", FakePrompt("long"), steps=50)
    short = FakeWork("generate", FakePrompt("short"), steps=1)
    f_long, f_short = s.submit(long), s.submit(short)
    assert f_short.result(timeout=5) == "short:1"
    assert not f_long.done()
    assert f_long.result(timeout=5) == "long:50"
    s.stop()


def test_stop_fails_queued_work_and_tolerates_cancelled_futures():
    runner = FakeRunner()
    runner.gate.clear()
    s = scheduler(runner, max_batch_size=1)
    running = s.submit(FakeWork("generate", FakePrompt("running")))
    time.sleep(0.1)
    queued = s.submit(FakeWork("generate", FakePrompt("queued")))
    cancelled = s.submit(FakeWork("generate", FakePrompt("gone")))
    assert cancelled.cancel()
    threading.Timer(0.2, runner.gate.set).start()
    s.stop()
    assert running.result(timeout=5) == "running:1"
    with pytest.raises(ServiceUnavailable):
        queued.result(timeout=5)
    with pytest.raises(ServiceUnavailable):
        s.submit(FakeWork("generate", FakePrompt("late")))


def test_a_failing_batch_fails_only_its_own_requests():
    class Broken(FakeRunner):
        def classify(self, works):
            raise RuntimeError("boom")

    s = scheduler(Broken())
    bad = s.submit(FakeWork("classify", FakePrompt("c")))
    with pytest.raises(RuntimeError, match="boom"):
        bad.result(timeout=5)
    assert s.submit(FakeWork("generate", FakePrompt("g"))).result(timeout=5) == "g:1"
    s.stop()
