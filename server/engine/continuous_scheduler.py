"""The scheduler for continuous batching: one worker thread loops

    admit newcomers that fit (one batched prefill) -> one decode step for all
    running rows -> answer the rows that finished,

and runs queued classify requests as a batch between two steps. When nothing
is running it waits, as the static scheduler does, up to `max_wait_s` after
the oldest request for company, so that a burst is prefilled together.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from server.engine.batch import ContinuousBatcher
from server.engine.request import ClassifyWork, GenerateWork
from server.engine.runner import ModelRunner
from server.engine.scheduler import BatchStats, QueueWorker, Work

log = logging.getLogger(__name__)


class ContinuousScheduler(QueueWorker):
    thread_name = "ptserve-continuous"

    def __init__(self, batcher: ContinuousBatcher, runner: ModelRunner, max_batch_size: int, max_wait_s: float,
                 stats: BatchStats, max_queue: int = 1024):  # fmt: skip
        """max_batch_size bounds a classify batch, one prefill batch, and the wait for company."""
        super().__init__(max_batch_size, max_wait_s, stats, max_queue)
        self.batcher = batcher
        self.runner = runner  # classification only

    def _fail_running(self, error: Exception) -> None:
        for row in self.batcher.rows:
            if not row.work.future.done():
                row.work.future.set_exception(error)
        self.batcher.rows.clear()

    def _take(self) -> tuple[list[ClassifyWork], list[GenerateWork]] | None:
        """Wait for work; take a classify batch and the generate newcomers that fit."""
        with self._cond:
            while not self._queue and not self.batcher.running and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            if not self.batcher.running:
                self._wait_for_company(lambda: len(self._queue))
            classify: list[ClassifyWork] = []
            admitted: list[GenerateWork] = []
            rest: deque[Work] = deque()
            blocked = False  # generate work is admitted in arrival order: none overtakes one that waits
            for w in self._queue:
                if w.future.cancelled():  # its client left while it waited: it takes no room
                    continue
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

    def _loop(self) -> None:
        while True:
            try:
                if not self._iteration():
                    return
            except Exception as e:  # the worker must never die silently: fail what is in flight, go on
                log.exception("scheduler iteration failed")
                self._fail_running(e)

    def _iteration(self) -> bool:
        self.batcher.drop_abandoned(self._finish)  # free their slots before admitting newcomers
        taken = self._take()
        if taken is None:
            return False
        classify, admitted = taken
        if classify:
            self._guarded("classify", classify, self._classify, classify)
        if admitted:
            self._guarded("prefill", admitted, self.batcher.admit, admitted, self._finish)
        if self.batcher.running:
            self._guarded("decode", [r.work for r in self.batcher.rows], self.batcher.step, self._finish)
        return True

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
            if kind == "decode":  # a failed step leaves every row's cache in doubt
                works = [r.work for r in self.batcher.rows]
                self.batcher.rows.clear()
            elif kind == "prefill":  # newcomers come after the older rows: those keep their slots
                failed = {id(w) for w in works}
                self.batcher.rows = [r for r in self.batcher.rows if id(r.work) not in failed]
            for w in works:  # a failed classify batch touches no row
                if not w.future.done():
                    w.future.set_exception(e)
            return
        seconds = time.perf_counter() - start
        tasks = len({(w.prompt.task_id, w.prompt.version) for w in works})
        self.stats.record(kind, len(works), tasks, seconds)
        log.debug("batch kind=%s size=%d tasks=%d seconds=%.4f", kind, len(works), tasks, seconds)
