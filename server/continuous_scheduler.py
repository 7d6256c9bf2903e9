"""The scheduler for continuous batching: one worker thread loops

    admit newcomers that fit (one batched prefill) -> one decode step for all
    running rows -> answer the rows that finished,

and runs queued classify requests as a batch between two steps. When nothing
is running it waits, as the static scheduler does, up to `max_wait_s` after
the oldest request for company, so that a burst is prefilled together.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from prompt_store.errors import ServiceUnavailable

from .continuous import ContinuousBatcher
from .runner import ModelRunner
from .scheduler import BatchStats, Work
from .work import ClassifyWork, GenerateWork

log = logging.getLogger(__name__)


class ContinuousScheduler:
    def __init__(self, batcher: ContinuousBatcher, runner: ModelRunner, max_batch_size: int, max_wait_s: float,
                 stats: BatchStats):  # fmt: skip
        self.batcher = batcher
        self.runner = runner  # classification only
        self.max_batch_size = max_batch_size  # bound on a classify batch and on one prefill batch
        self.max_wait_s = max_wait_s
        self.stats = stats
        self._queue: deque[Work] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ptserve-continuous", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        shutting_down = ServiceUnavailable("server is shutting down")
        for work in self._queue:
            if work.future.set_running_or_notify_cancel():
                work.future.set_exception(shutting_down)
        self._queue.clear()
        for row in self.batcher.rows:
            if not row.work.future.done():
                row.work.future.set_exception(shutting_down)
        self.batcher.rows.clear()

    def submit(self, work: Work):
        with self._cond:
            if self._stopping:
                raise ServiceUnavailable("server is shutting down")
            self._queue.append(work)
            self._cond.notify_all()
        return work.future

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def _take(self) -> tuple[list[ClassifyWork], list[GenerateWork]] | None:
        """Wait for work; take a classify batch and the generate newcomers that fit."""
        with self._cond:
            while not self._queue and not self.batcher.running and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            if not self.batcher.running and self._queue:
                deadline = self._queue[0].submitted_at + self.max_wait_s
                while len(self._queue) < self.max_batch_size and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            classify: list[ClassifyWork] = []
            admitted: list[GenerateWork] = []
            rest: deque[Work] = deque()
            blocked = False  # generate work is admitted in arrival order: none overtakes one that waits
            for w in self._queue:
                if w.kind == "classify" and len(classify) < self.max_batch_size:
                    classify.append(w)
                elif w.kind == "generate" and not blocked and len(admitted) < self.max_batch_size \
                        and self.batcher.fits(w, admitted):  # fmt: skip
                    admitted.append(w)
                else:
                    blocked = blocked or w.kind == "generate"
                    rest.append(w)
            self._queue = rest
        live = lambda works: [w for w in works if w.future.set_running_or_notify_cancel()]  # noqa: E731
        return live(classify), live(admitted)

    def _finish(self, work: Work, result) -> None:
        if isinstance(result, Exception):
            work.future.set_exception(result)
        else:
            work.future.set_result(result)

    def _loop(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            classify, admitted = taken
            if classify:
                self._guarded("classify", classify, self._classify, classify)
            if admitted:
                self._guarded("prefill", admitted, self.batcher.admit, admitted, self._finish)
            if self.batcher.running:
                self._guarded("decode", [r.work for r in self.batcher.rows], self.batcher.step, self._finish)

    def _classify(self, works: list[ClassifyWork]) -> None:
        for w, r in zip(works, self.runner.classify(works)):
            self._finish(w, r)

    def _guarded(self, kind: str, works: list[Work], run, *args) -> None:
        """Run one forward pass; if it fails, fail its requests (and drop their rows), not the server."""
        start = time.perf_counter()
        try:
            run(*args)
        except Exception as e:
            log.exception("%s batch of %d failed", kind, len(works))
            failed = {id(w) for w in works}
            self.batcher.rows = [r for r in self.batcher.rows if id(r.work) not in failed]
            for w in works:
                if not w.future.done():
                    w.future.set_exception(e)
            if self.batcher.rows:  # slots no longer match rows: fail the rest rather than serve garbage
                for r in self.batcher.rows:
                    r.work.future.set_exception(e)
                self.batcher.rows.clear()
            return
        seconds = time.perf_counter() - start
        tasks = len({(w.prompt.task_id, w.prompt.version) for w in works})
        self.stats.record(kind, len(works), tasks, seconds)
        log.debug("batch kind=%s size=%d tasks=%d seconds=%.4f", kind, len(works), tasks, seconds)
