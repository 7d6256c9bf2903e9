"""Building the engine: everything the routes talk to, made once in the lifespan.

The scheduler is built in one place, `make_scheduler`; only this file looks
behind it, at the backend of its generate batch (its position limit and its
prefix cache).
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass, field

from prompt_store.errors import StoreUnavailable
from prompt_store.factory import open_fine_tuning_store, open_store
from prompt_store.store import PromptStore
from ptcore import cpu_threads
from ptcore.model import LoadedModel, load_model
from server.engine.backends import make_batch
from server.engine.classify import Classifier
from server.engine.scheduler import Scheduler
from server.engine.slot_backend import SlotBackend
from server.engine.stats import BatchStats
from server.fine_tuning.files import Files
from server.fine_tuning.jobs import Jobs
from server.inference import Inference
from server.prompt_cache import PromptCache
from server.settings import EngineKind, Settings
from server.tasks import TaskManager

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Engine:
    settings: Settings
    loaded: LoadedModel
    store: PromptStore
    prompts: PromptCache  # the tasks' prompt rows on the device (LRU, fresh against the store)
    tasks: TaskManager
    inference: Inference
    scheduler: Scheduler  # owns the model: the one worker thread that runs forward passes
    batch_stats: BatchStats
    files: Files  # fine-tuning: training files
    jobs: Jobs  # fine-tuning: jobs, trained between inference iterations

    def start(self) -> None:
        """On the event loop that will serve the requests."""
        self.inference.start()
        self.jobs.start()

    draining: bool = field(default=False, init=False)  # shutting down: new requests are refused (api/shutdown.py)
    stopped: bool = field(default=False, init=False)

    def stop(self) -> None:
        """Fail what is queued or running, and close the store (once; later calls do nothing).
        Each step runs even when one before it failed (a store that is down fails the jobs' step)."""
        if self.stopped:
            return
        self.stopped = True
        try:
            self.jobs.stop()
        finally:
            try:
                self.scheduler.stop()
            finally:
                self.inference.close()
                self.store.close()

    def drain(self) -> None:
        """From now on, refuse new requests; those queued or running go on."""
        self.draining = True

    def busy(self) -> bool:
        """Whether a request is being prepared, queued, running or read (fine-tuning jobs aside: they
        stop with the server). On the event loop. Every submitted request keeps its output channel
        open until its last record is read, so Inference.busy() covers the queue and the batch."""
        return self.inference.busy()

    def why_not_ready(self) -> str | None:
        """What keeps this engine from serving now, or None. Blocks: pings the store."""
        if self.draining:
            return "server is shutting down"
        if not self.scheduler.alive():
            return "the model worker is not running"
        try:
            self.store.ping()
        except StoreUnavailable as e:
            return str(e)
        return None

    def stats(self) -> dict:
        """/v1/stats and /metrics: batch sizes, cache counters, queue depth."""
        backend = _backend(self.scheduler)
        slots = isinstance(backend, SlotBackend)
        return {
            "batches": self.batch_stats.snapshot(),
            "prompt_cache": self.prompts.stats(),
            "engine": "continuous" if slots else "static",
            "running": self.scheduler.running() if backend is not None else None,
            "prefix_cache": backend.prefixes.stats() if slots else None,
            "queue_depth": self.scheduler.queue_depth(),
            "fine_tuning": self.jobs.stats(),
            "server": {
                "model": self.loaded.info["name_or_path"],
                "family": self.loaded.family,
                "device": str(self.loaded.device),
                "dtype": str(self.loaded.dtype).removeprefix("torch."),
                "version": VERSION,
            },  # fmt: skip
        }


def _version() -> str:
    try:
        return importlib.metadata.version("ptserve")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


VERSION = _version()


def build_engine(settings: Settings, loaded: LoadedModel | None = None) -> Engine:
    """`loaded`: an already loaded model to serve instead of loading settings.model.
    The calling thread computes on one CPU thread from now on, the scheduler's
    on settings.cpu_threads (see ptcore/cpu_threads.py)."""
    cpu_threads.serial()
    if loaded is None:
        loaded = load_model(
            settings.model, settings.device, settings.dtype, settings.model_family, settings.device_map,
            settings.model_cache,
        )  # fmt: skip
    if settings.engine == EngineKind.CONTINUOUS and loaded.family != "causal":
        raise ValueError(
            f"engine=continuous needs a causal LM; {loaded.info['name_or_path']!r} is a {loaded.family} model"
        )
    store = open_store(settings.store, settings.keep_versions)
    prompts = PromptCache(store, loaded, settings.prompt_cache_size, settings.max_artifact_bytes)
    batch_stats = BatchStats()
    scheduler = make_scheduler(settings, loaded, batch_stats)
    limit = position_limit(scheduler, loaded)
    if scheduler.batch is not None and limit is not None and settings.default_max_new_tokens >= limit:
        raise ValueError(
            f"default_max_new_tokens {settings.default_max_new_tokens} leaves no room for any input in the {limit} "
            f"positions a request may use here (max_seq_len {settings.max_seq_len}, the model's "
            f"{loaded.max_positions}): every generate request that keeps the default would be refused"
        )
    inference = Inference(settings, loaded, prompts, scheduler, limit)
    tasks = TaskManager(settings, loaded, store, prompts, inference, batch_stats)
    fine_tuning = open_fine_tuning_store(settings.store)
    files = Files(fine_tuning, settings.max_file_bytes, settings.max_file_lines, settings.max_files)
    jobs = Jobs(fine_tuning, files, tasks, inference, loaded, settings)
    return Engine(settings, loaded, store, prompts, tasks, inference, scheduler, batch_stats, files, jobs)


def make_scheduler(settings: Settings, loaded: LoadedModel, stats: BatchStats) -> Scheduler:
    """The one scheduler, over the generate batch whose backend suits this model
    and these settings (server/engine/backends.py), and the classifier."""
    threads = cpu_threads.resolve(settings.cpu_threads)
    batch = make_batch(loaded, settings.engine.value, bool(settings.device_map), settings.max_running,
                       settings.max_seq_len, settings.max_tokens_in_flight, settings.prefix_cache_size,
                       settings.cuda_graphs, settings.compile, cpu_packed_weights=settings.cpu_packed_weights,
                       threads=threads)  # fmt: skip
    return Scheduler(batch, Classifier(loaded, settings.max_classify_rows), settings.max_batch_size,
                     settings.max_wait_ms / 1000, stats, settings.max_queue, threads, settings.train_share)  # fmt: skip


def _backend(scheduler: Scheduler):
    """The backend of the scheduler's generate batch (None: a model that only classifies)."""
    return scheduler.batch.backend if scheduler.batch is not None else None


def position_limit(scheduler: Scheduler, loaded: LoadedModel) -> int | None:
    """Input + new tokens of one generate request, at most (None: unbounded):
    the backend's bound (a slot's length, or the model's positions)."""
    backend = _backend(scheduler)
    return backend.max_len if backend is not None else loaded.max_positions
