"""Fine-tuning jobs: OpenAI's /v1/fine_tuning/jobs, trained on the served model.

A job is checked when it is created (its files parse with its template and
labels, its size is within the limits) and waits in this replica's queue;
one runs at a time. Running, its trainer's passes go to the scheduler as one
TrainingRun (server/engine/training.py), whose records come back on the
output channel; epochs become events. At the end the best table becomes a
new version of the task named by `suffix`, unless it did not beat the manual
prompt (`from_prompt`); `promote: "always"` stores it anyway.

Jobs and their events live in the fine-tuning store, so every replica lists
them. A replica renews a lease on the jobs it holds; a job whose lease ran
out while queued or running (its server stopped) reads as failed, on any
replica.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from prompt_store.artifact import artifact_bytes, read_artifact
from prompt_store.fine_tuning_store import ACTIVE, FineTuningStore, held
from ptcore.errors import Abandoned, InvalidRequest, NotFound, Overloaded
from ptuning.data import split_dev
from ptuning.train import Done, EpochEnd, Note, PromptTrainer, TrainConfig
from server.engine.outputs import Output
from server.engine.training import TrainingRun
from server.fine_tuning.files import Files
from server.fine_tuning.job_spec import check_job, job_examples

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"ftjob-[0-9a-f]{24}")
SERVER_STOPPED = {"code": "server_stopped", "message": "the server running it stopped", "param": None}


class Jobs:
    def __init__(self, store: FineTuningStore, files: Files, tasks, inference, loaded, settings):
        self.store = store
        self.files = files
        self.tasks = tasks
        self.inference = inference
        self.loaded = loaded
        self.settings = settings
        self.base_model = loaded.info["name_or_path"]
        self._waiting: deque[str] = deque()  # this replica's queued job ids
        self._running: tuple[str, int | None] | None = None  # (job id, scheduler run id once submitted)
        self._cancelled: set[str] = set()
        self._wake: asyncio.Event | None = None  # from start(), on the event loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []

    # -- the API's view --------------------------------------------------------

    def create(self, body: dict) -> dict:
        """Check a job and queue it (blocking: reads its files). -> the job object."""
        spec = check_job(body, self.base_model, self.loaded, self.files, self.tasks, self.settings)
        now = int(time.time())
        job = {
            "id": f"ftjob-{uuid.uuid4().hex[:24]}", "object": "fine_tuning.job", "created_at": now,
            "model": spec["model"], "training_file": spec["training_file"],
            "validation_file": spec["validation_file"], "suffix": spec["suffix"], "status": "queued",
            "hyperparameters": spec["hyperparameters"], "seed": spec["config"]["seed"], "error": None,
            "fine_tuned_model": None, "finished_at": None, "trained_tokens": None, "estimated_finish": None,
            "result_files": [], "organization_id": "ptserve", "integrations": [], "metadata": body.get("metadata"),
            "ptserve": {"config": spec["config"], "promote": spec["promote"], "going_on": spec["going_on"]},
        }  # fmt: skip
        if len(self._waiting) >= self.settings.max_queued_jobs:
            raise Overloaded(f"{len(self._waiting)} fine-tuning jobs already wait on this server; try again later")
        self.store.put_lease(job["id"], self._lease_until())  # first: a job is never seen without a lease
        self.store.put_job(job)
        self._event(job["id"], "info", f"Validated {spec['examples']} training examples; the job is queued")
        self._waiting.append(job["id"])
        if self._loop is not None:  # create() runs on a worker thread
            self._loop.call_soon_threadsafe(self._wake.set)
        return public(job)

    def get(self, job_id: str) -> dict:
        return public(self._job(job_id))

    def list(self, after: str | None, limit: int) -> dict:
        return page([public(self._expired(j)) for j in self.store.jobs()], after, limit)

    def events(self, job_id: str, after: str | None, limit: int) -> dict:
        self._job(job_id)
        return page(list(reversed(self.store.events(job_id))), after, limit)  # newest first, as OpenAI lists them

    def cancel(self, job_id: str) -> dict:
        job = self._job(job_id)
        if job["status"] not in ACTIVE:
            raise InvalidRequest(f"job {job_id} is {job['status']}; only a queued or running job can be cancelled")
        try:
            self._waiting.remove(job_id)
        except ValueError:  # not (or no longer) waiting here
            pass
        else:
            return public(self._finish(job, "cancelled", None, "The job was cancelled before it ran"))
        running = self._running  # one read: the loop may change it meanwhile
        if running is not None and running[0] == job_id:
            self._cancelled.add(job_id)  # _run checks it again once the run is submitted
            if running[1] is not None:
                self.inference.scheduler.abort(running[1])
            return public(job)
        raise InvalidRequest(f"job {job_id} runs on another replica; cancel it there")

    def stats(self) -> dict:
        """This replica's jobs now, and what training has cost the model since startup."""
        share = self.inference.scheduler.share
        running = self._running  # one read: the event loop may clear it meanwhile (a scrape runs on a worker)
        return {"running": running[0] if running else None, "queued": len(self._waiting),
                "training_passes": share.passes, "training_seconds": share.training_seconds,
                "inference_seconds": share.inference_seconds}  # fmt: skip

    # -- running ---------------------------------------------------------------

    def start(self) -> None:
        """On the event loop: the worker that runs queued jobs, and the lease renewer."""
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._tasks = [asyncio.create_task(self._work()), asyncio.create_task(self._renew())]

    def stop(self) -> None:
        """On the event loop, at shutdown: the jobs this replica holds end failed
        (their training stops with the server)."""
        for task in self._tasks:
            task.cancel()
        held = self._held()
        self._waiting.clear()
        for job_id in held:
            job = self.store.job(job_id)
            if job is not None and job["status"] in ACTIVE:
                self._finish(job, "failed", SERVER_STOPPED)

    async def _work(self) -> None:
        while True:
            while not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            job_id = self._waiting.popleft()
            try:
                await self._run(job_id)
            except Exception as e:  # a job's failure must not stop the worker
                log.exception("fine-tuning job %s failed", job_id)
                try:
                    await run_in_threadpool(self._fail, job_id, str(e))
                except Exception:  # the store is down too: the job's lease runs out and it reads as failed
                    log.exception("could not mark fine-tuning job %s failed", job_id)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.settings.job_lease_s / 3)
            try:
                await run_in_threadpool(self._renew_leases, self._held())
            except Exception:  # a store hiccup must not end the renewals: the next round tries again
                log.exception("renewing the leases of fine-tuning jobs failed")

    def _held(self) -> list[str]:
        """The jobs this replica holds: queued here, or running."""
        return list(self._waiting) + ([self._running[0]] if self._running else [])

    def _fail(self, job_id: str, message: str) -> None:
        job = self.store.job(job_id)
        if job is not None:
            self._finish(job, "failed", {"code": "internal_error", "message": message, "param": None})

    def _renew_leases(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self.store.put_lease(job_id, self._lease_until())  # the lease only: the job object is not rewritten

    async def _run(self, job_id: str) -> None:
        self._running = (job_id, None)
        run_id, out = None, None
        try:
            job = await run_in_threadpool(self._started, job_id)
            trainer, train, dev = await run_in_threadpool(self._prepare, job)
            current = await run_in_threadpool(self._current, job, trainer)
            if job_id in self._cancelled:  # cancelled while it was prepared
                out = Output(0, error=Abandoned("the training run was cancelled"))
            else:
                run = TrainingRun(
                    busy_pass_size=self.settings.train_micro_batch_size,
                    idle_pass_size=self.settings.train_idle_pass_size,
                )
                run.events = passes(trainer, train, dev, current, run.pass_size)
                run_id = self.inference.scheduler.submit_training(run)
                queue = self.inference.router.open(run_id)
                self._running = (job_id, run_id)
                if job_id in self._cancelled:  # cancelled between the check above and the submit
                    self.inference.scheduler.abort(run_id)
                began = time.monotonic()
                while True:
                    out = await queue.get()
                    if out.finished:
                        break
                    if isinstance(out.event, EpochEnd):
                        await run_in_threadpool(self._epoch, job_id, out.event, job, began, len(train))
                    elif isinstance(out.event, Note):
                        await run_in_threadpool(self._event, job_id, "warn", out.event.message)
        finally:
            if run_id is not None:
                self.inference.router.close(run_id)
                if out is None or not out.finished:  # this side failed: the run must not go on alone
                    self.inference.scheduler.abort(run_id)
            self._running = None
        if out.error is not None:
            cancelled = isinstance(out.error, Abandoned) and job_id in self._cancelled
            self._cancelled.discard(job_id)
            status, error = ("cancelled", None) if cancelled else (
                "failed", {"code": "training_failed", "message": str(out.error), "param": None})  # fmt: skip
            message = "The job was cancelled" if cancelled else f"Training failed: {out.error}"
            await run_in_threadpool(self._finish, self.store.job(job_id), status, error, message)
            return
        await run_in_threadpool(self._store_result, job_id, out.result)

    def _started(self, job_id: str) -> dict:
        job = self.store.job(job_id)
        job["status"] = "running"
        self.store.put_lease(job_id, self._lease_until())
        self.store.put_job(job)
        self._event(job_id, "info", "Fine-tuning job started")
        return job

    def _prepare(self, job: dict):
        config = TrainConfig(**job["ptserve"]["config"], progress=False)
        going_on = None
        if job["ptserve"].get("going_on") is not None:  # the task's version now, which may be newer than at creation
            stored = self.tasks.artifact(job["ptserve"]["going_on"])
            going_on = read_artifact(stored.data)
            self._event(job["id"], "info", f"Going on from version {stored.version} of task {stored.task_id!r}")
        trainer = PromptTrainer(self.loaded, config, going_on)
        limit = self.settings.max_input_tokens
        train = job_examples(self.files, job["training_file"], trainer, "training_file", limit)
        if job["validation_file"]:
            dev = job_examples(self.files, job["validation_file"], trainer, "validation_file", limit)
        else:
            train, dev = split_dev(train, 0.25, config.seed)
        return trainer, train, dev

    def _current(self, job: dict, trainer: PromptTrainer):
        """The rows of the task's current version, to compare the new table with
        on the validation data; None when there is none or it has another
        template or task type (an event says so)."""
        try:
            current = self.inference.prompts.get(job["suffix"])
        except NotFound:
            return None
        if current.template.source != trainer.template.source or current.task_type != trainer.config.task_type:
            self._event(job["id"], "info", f"Task {job['suffix']!r} has version {current.version} with another "
                        "template or task type: the new table is not compared with it")  # fmt: skip
            return None
        if current.head is not None or tuple(current.labels) != tuple(trainer.labels):
            self._event(job["id"], "info", f"Task {job['suffix']!r} version {current.version} has other labels "
                        "or a head: the new table is not compared with it")  # fmt: skip
            return None
        return current.version, current.rows

    def _epoch(self, job_id: str, event: EpochEnd, job: dict, began: float, examples: int) -> None:
        """An epoch's event: its figures, training examples per second and, after
        a trained epoch, the job's estimated finish (also set on the job)."""
        m = dict(event.metrics)
        if m["epoch"] >= 1:
            m["examples_per_s"] = examples / m["seconds"] if m["seconds"] > 0 else 0.0
            per_epoch = (time.monotonic() - began) / m["epoch"]
            m["estimated_finish"] = int(time.time() + per_epoch * (job["hyperparameters"]["n_epochs"] - m["epoch"]))
            current = self.store.job(job_id)
            current["estimated_finish"] = m["estimated_finish"]
            self.store.put_job(current)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float))
        note = " (starting prompt)" if m["epoch"] == 0 else (" (best so far)" if event.best else "")
        self._event(job_id, "info", f"epoch {m['epoch']}: {shown}{note}",
                    {k: v for k, v in m.items() if isinstance(v, (int, float))}, "metrics")  # fmt: skip

    def _store_result(self, job_id: str, finished: tuple) -> None:
        result, current, beats_current = finished
        job = self.store.job(job_id)
        metrics = result.artifact.meta["metrics"]
        beats_manual = metrics["best_epoch"] > 0  # epoch 0 is the starting (with from_prompt: the manual) prompt
        promote = job["ptserve"]["promote"] == "always" or (beats_manual and beats_current is not False)
        decision = {"best_epoch": metrics["best_epoch"], "promoted": promote, "beats_start": beats_manual,
                    "beats_current_version": beats_current,
                    **{k: v for k, v in metrics.items() if k.startswith(("dev_", "start_dev_"))}}  # fmt: skip
        if current is not None:
            decision["current_version"] = current
        job["ptserve"]["result"] = decision
        job["trained_tokens"] = metrics["trained_tokens"]
        if promote:
            result.artifact.meta["task_id"] = job["suffix"]
            summary = self.tasks.upload(job["suffix"], artifact_bytes(result.artifact))
            job["fine_tuned_model"] = job["suffix"]
            message = f"Stored as version {summary['version']} of task {job['suffix']!r}"
        elif not beats_manual:
            message = "No trained epoch beat the starting prompt on the validation data: nothing was stored"
        else:
            message = (f"The new table did not beat version {current['version']} of task {job['suffix']!r} on the "
                       "validation data: nothing was stored")  # fmt: skip
        self._finish(job, "succeeded", None, message)

    def _finish(self, job: dict, status: str, error: dict | None, message: str | None = None) -> dict:
        job["status"], job["error"], job["finished_at"] = status, error, int(time.time())
        self.store.put_job(job)
        self._event(job["id"], "error" if status == "failed" else "info", message or f"The job {status}")
        return job

    # -- records ---------------------------------------------------------------

    def _job(self, job_id: str) -> dict:
        job = self.store.job(job_id) if isinstance(job_id, str) and JOB_ID.fullmatch(job_id) else None
        if job is None:
            raise NotFound(f"no fine-tuning job {job_id!r}")
        return self._expired(job)

    def _expired(self, job: dict) -> dict:
        """A job whose lease ran out while active: its server stopped. Marked failed here, on any replica."""
        if job["status"] in ACTIVE and not held(self.store, job):
            return self._finish(job, "failed", SERVER_STOPPED)
        return job

    def _event(self, job_id: str, level: str, message: str, data: dict | None = None, kind: str = "message"):
        self.store.add_event(job_id, {"object": "fine_tuning.job.event", "id": f"ftevent-{uuid.uuid4().hex[:24]}",
                                      "created_at": int(time.time()), "level": level, "message": message,
                                      "data": data or {}, "type": kind})  # fmt: skip

    def _lease_until(self) -> float:
        return time.time() + self.settings.job_lease_s


@dataclass
class Finished:
    """A job's last pass: (TrainResult, the current version's figures or None, whether the new table beats them)."""

    result: tuple


def passes(trainer: PromptTrainer, train, dev, current, pass_size):
    """The trainer's passes, then (when the task has a comparable current
    version) those that score that version on the same validation data, all
    on the scheduler's thread, each of up to pass_size() examples."""
    for event in trainer.steps(train, dev, pass_size):
        if not isinstance(event, Done):
            yield event
            continue
        if current is None:
            yield Finished((event.result, None, None))
            return
        version, rows = current
        figures = yield from trainer.scoring(rows, dev, pass_size)
        best = {k: v for k, v in event.result.artifact.meta["metrics"].items() if k.startswith("dev_")}
        beats = trainer.better(best, figures)
        yield Finished((event.result, {"version": version, **figures}, beats))
        return


def page(items: list, after: str | None, limit: int) -> dict:
    """OpenAI's list object: up to `limit` items after the one with id `after` (none: from the first)."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


def public(job: dict) -> dict:
    """The job object as OpenAI's clients read it, with ptserve's result beside."""
    out = {k: v for k, v in job.items() if k != "ptserve"}
    if "result" in job["ptserve"]:
        out["ptserve_result"] = job["ptserve"]["result"]
    return out
