"""The scheduler: gathers concurrent requests of any tasks into batches.

One worker thread owns the model. It waits for the first request, then up to
`max_wait_s` for more of the same kind (generate or classify), takes at most
`max_batch_size` of them and hands the batch to the runner. Requests of other
kinds stay queued, in order, for the next batch. Every batch's size is recorded
in `BatchStats` (served at GET /v1/stats) and logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque

from prompt_store.errors import Overloaded, ServiceUnavailable
from server.engine.request import ClassifyWork, GenerateWork
from server.engine.runner import ModelRunner

log = logging.getLogger(__name__)

Work = GenerateWork | ClassifyWork


class BatchStats:
    def __init__(self, recent: int = 1024):
        self._lock = threading.Lock()
        self.batches = 0
        self.requests = 0
        self.sizes: Counter[int] = Counter()
        self.recent: deque[dict] = deque(maxlen=recent)

    def record(self, kind: str, size: int, num_tasks: int, seconds: float) -> None:
        """One forward batch of `size` rows. Kinds: generate / classify (static
        engine); prefill / decode / classify (continuous engine, where a
        request's rows appear again in every decode step)."""
        with self._lock:
            self.batches += 1
            if kind != "decode":
                self.requests += size
            self.sizes[size] += 1
            self.recent.append({"kind": kind, "size": size, "tasks": num_tasks, "seconds": round(seconds, 4)})

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "batches": self.batches,
                "requests": self.requests,
                "max_batch_size_seen": max(self.sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
                "recent": list(self.recent),
            }


class QueueWorker:
    """What both schedulers share: the request queue, the one worker thread
    that owns the model, submission, and shutdown."""

    thread_name = "ptserve-scheduler"

    def __init__(self, max_batch_size: int, max_wait_s: float, stats: BatchStats, max_queue: int = 1024):
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.stats = stats
        self.max_queue = max_queue
        self._queue: deque[Work] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the forward pass in progress, then fail whatever is still waiting."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        shutting_down = ServiceUnavailable("server is shutting down")
        for work in self._queue:
            if work.future.set_running_or_notify_cancel():  # False: the client already went away
                work.future.set_exception(shutting_down)
        self._queue.clear()
        self._fail_running(shutting_down)

    def submit(self, work: Work):
        """Queue one request; its future resolves to a GenerateResult / ClassifyResult."""
        with self._cond:
            if self._stopping:
                raise ServiceUnavailable("server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"{len(self._queue)} requests are already waiting; try again shortly")
            self._queue.append(work)
            self._cond.notify_all()
        return work.future

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def _wait_for_company(self, count) -> None:
        """Holding the lock, with a non-empty queue: wait until count() reaches
        max_batch_size or the oldest request has waited max_wait_s."""
        deadline = self._queue[0].submitted_at + self.max_wait_s
        while not self._stopping and count() < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)

    @staticmethod
    def _finish(work: Work, result) -> None:
        if isinstance(result, Exception):
            work.future.set_exception(result)
        else:
            work.future.set_result(result)

    def _fail_running(self, error: Exception) -> None:
        """Requests in flight when the worker stopped (none for a scheduler that finishes batches)."""

    def _loop(self) -> None:
        raise NotImplementedError


class Scheduler(QueueWorker):
    """Static batching: a batch of one kind runs to its end before the next starts."""

    def __init__(self, runner: ModelRunner, max_batch_size: int, max_wait_s: float, stats: BatchStats,
                 max_queue: int = 1024):  # fmt: skip
        super().__init__(max_batch_size, max_wait_s, stats, max_queue)
        self.runner = runner

    def _take_batch(self) -> list[Work]:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return []
            kind = self._queue[0].kind
            self._wait_for_company(lambda: sum(1 for w in self._queue if w.kind == kind))
            batch, rest = [], deque()
            for w in self._queue:
                (batch if w.kind == kind and len(batch) < self.max_batch_size else rest).append(w)
            self._queue = rest
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            batch = [w for w in batch if w.future.set_running_or_notify_cancel()]
            if batch:
                self._run(batch)

    def _run(self, batch: list[Work]) -> None:
        kind = batch[0].kind
        tasks = {(w.prompt.task_id, w.prompt.version) for w in batch}
        start = time.perf_counter()

        def finish(i: int, result) -> None:
            self._finish(batch[i], result)

        try:
            if kind == "generate":
                self.runner.generate(batch, on_finish=finish)
            else:
                for i, result in enumerate(self.runner.classify(batch)):
                    finish(i, result)
        except Exception as e:  # a failed forward pass fails its requests, not the server
            log.exception("%s batch of %d failed", kind, len(batch))
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(e)
            return
        seconds = time.perf_counter() - start
        self.stats.record(kind, len(batch), len(tasks), seconds)
        log.info("batch kind=%s size=%d tasks=%d seconds=%.3f", kind, len(batch), len(tasks), seconds)
