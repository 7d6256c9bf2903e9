"""The scheduler: one thread owns the model and loops

    apply aborts -> take queued work -> classify batch -> prefill the generate
    newcomers that fit -> one decode step for every running row -> hand over
    what changed

It talks to its callers by messages only: `submit` and `abort` go in (under a
lock, applied by the loop), and Output records come out, one list per forward
pass and one for the streamed text, through the sink given to `start`
(server/engine/outputs.py). No request state is shared with another thread.

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

from ptcore import cpu_threads
from ptcore.errors import Abandoned, Overloaded, ServiceUnavailable
from server.engine.batch import GenerateBatch
from server.engine.classify import Classifier
from server.engine.outputs import Collected, Output, OutputSink
from server.engine.request import Request
from server.engine.stats import BatchStats
from server.engine.training import TrainingRun, TrainingShare

log = logging.getLogger(__name__)


class Scheduler:
    thread_name = "ptserve-scheduler"

    def __init__(self, batch: GenerateBatch | None, classifier: Classifier, max_batch_size: int, max_wait_s: float,
                 stats: BatchStats, max_queue: int = 1024, threads: int = 0, train_share: float = 0.2):  # fmt: skip
        """batch: None for a model that only classifies. max_batch_size bounds a
        classify batch, one prefill batch, and the wait for company. threads:
        the CPU threads the loop's thread computes with (ptcore/cpu_threads.py;
        0: torch's settings as they are). train_share: the most of the model's
        time a training run takes while inference runs (server/engine/training.py)."""
        self.batch = batch
        self.classifier = classifier
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.stats = stats
        self.max_queue = max_queue
        self.threads = threads
        self.share = TrainingShare(train_share)
        self._training: TrainingRun | None = None
        self._queue: deque[Request] = deque()
        self._aborts: set[int] = set()  # ids of requests whose callers no longer want them
        self._next_id = 1
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sink: OutputSink = Collected()  # start() or collect() gives the real one
        self._pending: list[Output] = []  # records of this forward pass, not yet handed over

    # -- the callers' view -----------------------------------------------------

    def start(self, sink: OutputSink) -> None:
        """Run the loop on its own thread; every Output record goes to `sink`."""
        self._sink = sink
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
            self._answer(r, shutting_down)
        self._queue.clear()
        if self._training is not None:
            self._end_training(error=shutting_down)
        self._fail_running(shutting_down)
        self._flush()

    def submit(self, request: Request) -> int:
        """Queue one request; -> its id, which its Output records carry. Its last
        record holds a GenerateResult / ClassifyResult, or the error instead."""
        with self._cond:
            if self._stopping:
                raise ServiceUnavailable("server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"{len(self._queue)} requests are already waiting; try again shortly")
            request.id = self._next_id
            self._next_id += 1
            self._queue.append(request)
            self._cond.notify_all()
        return request.id

    def submit_training(self, run: TrainingRun) -> int:
        """Start a training run (one at a time); -> its id. Its passes run
        between iterations (server/engine/training.py); each gives a record
        with the pass's event, and the last one's `result` is the run's."""
        with self._cond:
            if self._stopping:
                raise ServiceUnavailable("server is shutting down")
            if self._training is not None:
                raise Overloaded("a training run is already running on this model")
            run.id = self._next_id
            self._next_id += 1
            self._training = run
            self._cond.notify_all()
        return run.id

    def abort(self, request_id: int) -> None:
        """The caller no longer wants this request: before the next forward pass
        it leaves the queue, or its row leaves the batch (freeing its slot).
        Its last record then carries Abandoned."""
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify_all()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def running(self) -> int:
        return self.batch.running if self.batch is not None else 0

    def collect(self) -> Collected:
        """Without the worker thread (the caller runs `iteration` itself): from now
        on, records go to the Collected returned."""
        self._sink = Collected()
        return self._sink

    def run_to_completion(self, requests: list[Request]) -> list:
        """Without the worker thread: submit `requests` and run the loop on this
        thread until each is answered; -> its result or its exception, in order
        (benchmarks, offline scoring)."""
        collected = self.collect()
        ids = [self.submit(r) for r in requests]
        while not all(i in collected.finals for i in ids):
            if not self.iteration():
                raise ServiceUnavailable("the scheduler is stopping")
        finals = [collected.finals[i] for i in ids]
        return [o.error if o.error is not None else o.result for o in finals]

    # -- the loop ------------------------------------------------------------

    def _loop(self) -> None:
        if self.threads:
            cpu_threads.use(self.threads)
        while True:
            try:
                if not self.iteration():
                    return
            except Exception as e:  # the worker must never die silently: fail what is in flight, go on
                log.exception("scheduler iteration failed")
                self._fail_running(e)

    def iteration(self) -> bool:
        """One pass of the loop; waits for work when there is none. False once stopping."""
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
        if self._training is not None:
            self._train(self._training)
        return True

    def _take(self) -> tuple[list[Request], list[Request]] | None:
        """Apply aborts, wait for work; take a classify batch and the generate newcomers that fit."""
        with self._cond:
            self._apply_aborts()  # frees their rows before newcomers are admitted
            while not self._queue and not self.running() and self._training is None and not self._stopping:
                self._cond.wait()
                self._apply_aborts()
            if not self._queue and not self.running() and self._training is not None and not self._stopping:
                self._cond.wait(self.share.idle_wait())  # training's next pass may have to wait: no spinning
                self._apply_aborts()
            if self._stopping:
                return None
            if not self.running() and self._queue:
                self._wait_for_company()
                self._apply_aborts()
            classify: list[Request] = []
            admitted: list[Request] = []
            rest: deque[Request] = deque()
            blocked = False  # generate requests are admitted in arrival order
            for r in self._queue:
                if r.kind == "classify" and len(classify) < self.max_batch_size:
                    classify.append(r)
                elif r.kind == "generate" and not blocked and len(admitted) < self.max_batch_size \
                        and self.batch.fits(r, admitted):  # fmt: skip
                    admitted.append(r)
                else:
                    blocked = blocked or r.kind == "generate"
                    rest.append(r)
            self._queue = rest
        return classify, admitted

    def _apply_aborts(self) -> None:
        """Holding the lock: the aborted requests leave the queue and the batch."""
        if not self._aborts:
            return
        aborts, self._aborts = self._aborts, set()
        if self._training is not None and self._training.id in aborts:
            self._end_training(error=Abandoned("the training run was cancelled"))
        gone = [r for r in self._queue if r.id in aborts]
        if gone:
            self._queue = deque(r for r in self._queue if r.id not in aborts)
        running = [r for r in self.batch.requests if r.id in aborts] if self.batch is not None else []
        if running:
            self.batch.remove(running)
        for r in gone + running:
            self._answer(r, Abandoned("the request was abandoned"))
        self._flush()

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
            self._answer(r, result)
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
                self._answer(r, e)
            self._flush()
            return
        for r in finished:
            self._answer(r, r.result())
        self._flush()
        seconds = time.perf_counter() - start
        self.share.earned(seconds)
        tasks = len({r.prompt.key for r in requests})
        self.stats.record(kind, len(requests), tasks, seconds)
        log.debug("batch kind=%s size=%d tasks=%d seconds=%.4f", kind, len(requests), tasks, seconds)

    def _train(self, run: TrainingRun) -> None:
        """One pass of the training run, if the share allows it now."""
        busy = self.share.busy(self.running() > 0 or bool(self._queue))
        if not self.share.may_run(busy):
            return
        start = time.perf_counter()
        try:
            event = run.step(busy)
        except Exception as e:  # the run fails; inference goes on
            log.exception("training run %d failed", run.id)
            self._end_training(error=e)
            return
        finally:
            self.share.spent(time.perf_counter() - start, busy)
        if getattr(event, "result", None) is not None:
            self._end_training(result=event.result)
        else:
            self._pending.append(Output(run.id, event=event))
            self._flush()

    def _end_training(self, result=None, error: Exception | None = None) -> None:
        """The training run's last record."""
        run, self._training = self._training, None
        self._pending.append(Output(run.id, result=result, error=error))
        self._flush()

    def _stream(self) -> None:
        """A record for each streamed request whose tokens completed more text."""
        if self.batch is None:
            return
        for r in self.batch.requests:
            if r.stream:
                piece = r.new_text()
                if piece:
                    self._pending.append(Output(r.id, r.new_token_ids(), piece))
        self._flush()

    def _fail_running(self, error: Exception) -> None:
        if self.batch is None:
            return
        running = list(self.batch.requests)
        self.batch.remove(running)
        for r in running:
            self._answer(r, error)
        self._flush()

    def _answer(self, request: Request, result) -> None:
        """The request's last record: its result, or the error that answers it. A
        streamed request's carries the rest of its text: the streamed pieces are
        always a beginning of the final text, so together they make all of it."""
        tokens = request.new_token_ids() if request.kind == "generate" else ()
        if isinstance(result, Exception):
            self._pending.append(Output(request.id, tokens, error=result))
        else:
            rest = result.text[request.streamed :] if request.stream else ""
            self._pending.append(Output(request.id, tokens, rest, result=result))
            if request.kind == "generate":
                self.stats.count_generated(request.prompt.task_id, len(result.token_ids))

    def _flush(self) -> None:
        """Hand the records gathered so far to the sink, in one call."""
        if self._pending:
            pending, self._pending = self._pending, []
            try:
                self._sink.put(pending)
            except Exception:  # the loop must go on: these records are lost, their callers time out
                log.exception("handing over %d output records failed", len(pending))
