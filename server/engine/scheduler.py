"""The scheduler: one thread owns the model and loops

    drop abandoned rows -> take queued work -> classify batch -> prefill the
    generate newcomers that fit -> one decode step for every running row ->
    answer what finished -> hand streaming requests their new text

Requests of any tasks share every forward pass. Generate requests are
admitted in arrival order (none overtakes one that waits for room); a classify
batch runs between two decode steps. When nothing is running, the first
request waits up to `max_wait_s` for company, so a burst is prefilled together.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from prompt_store.errors import Abandoned, Overloaded, ServiceUnavailable
from server.engine.batch import GenerateBatch
from server.engine.classify import Classifier
from server.engine.request import Request
from server.engine.stats import BatchStats

log = logging.getLogger(__name__)


class Scheduler:
    thread_name = "ptserve-scheduler"

    def __init__(self, batch: GenerateBatch | None, classifier: Classifier, max_batch_size: int, max_wait_s: float,
                 stats: BatchStats, max_queue: int = 1024):  # fmt: skip
        """batch: None for a model that only classifies. max_batch_size bounds a
        classify batch, one prefill batch, and the wait for company."""
        self.batch = batch
        self.classifier = classifier
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.stats = stats
        self.max_queue = max_queue
        self._queue: deque[Request] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the HTTP side's view ------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish the forward pass in progress, then fail whatever is still waiting or running."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        shutting_down = ServiceUnavailable("server is shutting down")
        for r in self._queue:
            if r.future.set_running_or_notify_cancel():  # False: the client already went away
                r.future.set_exception(shutting_down)
        self._queue.clear()
        self._fail_running(shutting_down)

    def submit(self, request: Request):
        """Queue one request; its future resolves to a GenerateResult / ClassifyResult."""
        with self._cond:
            if self._stopping:
                raise ServiceUnavailable("server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"{len(self._queue)} requests are already waiting; try again shortly")
            self._queue.append(request)
            self._cond.notify_all()
        return request.future

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def running(self) -> int:
        return self.batch.running if self.batch is not None else 0

    def run_to_completion(self, requests: list[Request]) -> list:
        """Without the worker thread: submit `requests` and run the loop on this
        thread until each is answered; -> its result or its exception, in order
        (benchmarks, offline scoring)."""
        for r in requests:
            self.submit(r)
        while not all(r.future.done() for r in requests):
            if not self.iteration():
                raise ServiceUnavailable("the scheduler is stopping")
        return [r.future.exception() or r.future.result() for r in requests]

    # -- the loop ------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:
                if not self.iteration():
                    return
            except Exception as e:  # the worker must never die silently: fail what is in flight, go on
                log.exception("scheduler iteration failed")
                self._fail_running(e)

    def iteration(self) -> bool:
        """One pass of the loop; waits for work when there is none. False once stopping."""
        self._drop_abandoned()  # free their rows before admitting newcomers
        taken = self._take()
        if taken is None:
            return False
        classify, admitted = taken
        if classify:
            self._run("classify", classify, lambda: self._classify(classify))
        if admitted:
            self._run("prefill", admitted, lambda: self.batch.prefill(admitted))
        if self.batch is not None and self.batch.running:
            self._run("decode", list(self.batch.requests), self.batch.decode)
        self._stream()
        return True

    def _take(self) -> tuple[list[Request], list[Request]] | None:
        """Wait for work; take a classify batch and the generate newcomers that fit."""
        with self._cond:
            while not self._queue and not self.running() and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            if not self.running():
                self._wait_for_company()
            classify: list[Request] = []
            admitted: list[Request] = []
            rest: deque[Request] = deque()
            blocked = False  # generate requests are admitted in arrival order
            for r in self._queue:
                if r.future.cancelled():  # its client left while it waited: it takes no room
                    continue
                if r.kind == "classify" and len(classify) < self.max_batch_size:
                    classify.append(r)
                elif r.kind == "generate" and not blocked and len(admitted) < self.max_batch_size \
                        and self.batch.fits(r, admitted):  # fmt: skip
                    admitted.append(r)
                else:
                    blocked = blocked or r.kind == "generate"
                    rest.append(r)
            self._queue = rest
        live = lambda rs: [r for r in rs if r.future.set_running_or_notify_cancel()]  # noqa: E731
        return live(classify), live(admitted)

    def _wait_for_company(self) -> None:
        """Holding the lock, with a non-empty queue: wait until max_batch_size
        requests wait or the oldest has waited max_wait_s."""
        deadline = self._queue[0].submitted_at + self.max_wait_s
        while not self._stopping and len(self._queue) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)

    def _classify(self, requests: list[Request]) -> list[Request]:
        for r, result in zip(requests, self.classifier.run(requests)):
            _answer(r, result)
        return []

    def _run(self, kind: str, requests: list[Request], forward: Callable[[], list[Request]]) -> None:
        """Run one forward pass and answer the requests it finished. If it fails,
        fail its requests (and free their rows), not the server."""
        start = time.perf_counter()
        try:
            finished = forward()
        except Exception as e:
            log.exception("%s batch of %d failed", kind, len(requests))
            if kind == "decode":  # a failed step leaves every row's state in doubt
                requests = list(self.batch.requests)
            if self.batch is not None:
                self.batch.remove(requests)
            for r in requests:
                _answer(r, e)
            return
        for r in finished:
            _answer(r, r.result())
        seconds = time.perf_counter() - start
        tasks = len({r.prompt.key for r in requests})
        self.stats.record(kind, len(requests), tasks, seconds)
        log.debug("batch kind=%s size=%d tasks=%d seconds=%.4f", kind, len(requests), tasks, seconds)

    def _drop_abandoned(self) -> None:
        if self.batch is None:
            return
        gone = [r for r in self.batch.requests if r.abandoned]
        if gone:
            self.batch.remove(gone)
            for r in gone:
                _answer(r, Abandoned("the request was abandoned"))

    def _stream(self) -> None:
        """Hand each streaming request the text its new tokens completed."""
        if self.batch is None:
            return
        for r in self.batch.requests:
            if r.on_text is not None:
                piece = r.new_text()
                if not piece:
                    continue
                try:
                    r.on_text(piece)
                except Exception:  # its client's side is gone (e.g. a closed event loop): drop it alone
                    log.exception("streaming to one request failed; abandoning it")
                    r.abandoned = True

    def _fail_running(self, error: Exception) -> None:
        if self.batch is None:
            return
        running = list(self.batch.requests)
        self.batch.remove(running)
        for r in running:
            _answer(r, error)


def _answer(request: Request, result) -> None:
    if request.future.done():
        return
    if isinstance(result, Exception):
        request.future.set_exception(result)
    else:
        request.future.set_result(result)
