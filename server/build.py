"""Building the engine: everything the routes talk to, made once in the lifespan.

The scheduler is built in one place, `make_scheduler`, and only this file
looks behind it (at the continuous batcher: its position limit, running rows,
prefix cache), so that another scheduler replaces this file's scheduler parts
and nothing else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prompt_store.errors import StoreUnavailable
from prompt_store.store import PromptStore, open_store
from ptcore.model import LoadedModel, load_model
from server.engine.batch import ContinuousBatcher
from server.engine.continuous_scheduler import ContinuousScheduler
from server.engine.models import decoder_for
from server.engine.runner import ModelRunner
from server.engine.scheduler import BatchStats, QueueWorker, Scheduler
from server.inference import Inference
from server.prompt_cache import PromptCache
from server.settings import EngineKind, Settings
from server.tasks import TaskManager

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Engine:
    settings: Settings
    loaded: LoadedModel
    store: PromptStore
    prompts: PromptCache  # the tasks' prompt rows on the device (LRU, fresh against the store)
    tasks: TaskManager
    inference: Inference
    scheduler: QueueWorker  # owns the model: the one worker thread that runs forward passes
    batch_stats: BatchStats

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        self.store.close()

    def why_not_ready(self) -> str | None:
        """What keeps this engine from serving now, or None. Blocks: pings the store."""
        if not self.scheduler.alive():
            return "the model worker is not running"
        try:
            self.store.ping()
        except StoreUnavailable as e:
            return str(e)
        return None

    def stats(self) -> dict:
        """/v1/stats and /metrics: batch sizes, cache counters, queue depth."""
        batcher = _batcher(self.scheduler)
        return {
            "batches": self.batch_stats.snapshot(),
            "prompt_cache": self.prompts.stats(),
            "engine": "continuous" if batcher is not None else "static",
            "running": batcher.running if batcher is not None else None,
            "prefix_cache": batcher.prefixes.stats() if batcher is not None else None,
            "queue_depth": self.scheduler.queue_depth(),
        }


def build_engine(settings: Settings, loaded: LoadedModel | None = None) -> Engine:
    """`loaded`: an already loaded model to serve instead of loading settings.model."""
    if loaded is None:
        loaded = load_model(
            settings.model, settings.device, settings.dtype, settings.model_family, settings.device_map,
            settings.model_cache,
        )  # fmt: skip
    if settings.engine == EngineKind.CONTINUOUS and loaded.family != "causal":
        raise ValueError(
            f"engine=continuous needs a causal LM; {loaded.info['name_or_path']!r} is a {loaded.family} model"
        )
    store = open_store(settings.store)
    prompts = PromptCache(store, loaded, settings.prompt_cache_size, settings.max_artifact_bytes)
    batch_stats = BatchStats()
    scheduler = make_scheduler(settings, loaded, batch_stats)
    inference = Inference(settings, loaded, prompts, scheduler, position_limit(scheduler, loaded))
    tasks = TaskManager(settings, loaded, store, prompts, inference)
    return Engine(settings, loaded, store, prompts, tasks, inference, scheduler, batch_stats)


def make_scheduler(settings: Settings, loaded: LoadedModel, stats: BatchStats) -> QueueWorker:
    """The scheduler for this model and these settings: continuous batching over a
    slot KV cache where the architecture allows it, else static batches."""
    runner = ModelRunner(loaded, settings.max_classify_rows)
    batcher = _continuous_batcher(settings, loaded)
    wait = settings.max_wait_ms / 1000
    log.info("engine: %s", "continuous" if batcher is not None else "static")
    if batcher is not None:
        return ContinuousScheduler(batcher, runner, settings.max_batch_size, wait, stats, settings.max_queue)
    return Scheduler(runner, settings.max_batch_size, wait, stats, settings.max_queue)


def _continuous_batcher(settings: Settings, loaded: LoadedModel) -> ContinuousBatcher | None:
    if settings.engine == EngineKind.STATIC or loaded.family != "causal" or settings.device_map:
        return None  # a model spread by device_map runs through its own (hooked) forward
    decoder = decoder_for(loaded.model)
    if decoder is None:
        if settings.engine == EngineKind.CONTINUOUS:
            raise ValueError(f"engine=continuous does not cover model_type {loaded.model.config.model_type!r}")
        return None
    max_len = min(settings.max_seq_len, loaded.max_positions or settings.max_seq_len)
    return ContinuousBatcher(
        loaded,
        decoder,
        max_running=settings.max_running,
        max_len=max_len,
        max_tokens=settings.max_tokens_in_flight or settings.max_running * max_len,
        prefix_cache_size=settings.prefix_cache_size,
        cuda_graphs=settings.cuda_graphs,
        compile=settings.compile,
    )


def _batcher(scheduler: QueueWorker) -> ContinuousBatcher | None:
    """The continuous batcher behind `scheduler` (None: the static engine)."""
    return scheduler.batcher if isinstance(scheduler, ContinuousScheduler) else None


def position_limit(scheduler: QueueWorker, loaded: LoadedModel) -> int | None:
    """Input + new tokens of one generate request, at most (None: unbounded):
    a continuous batcher's slot length, else the model's positions."""
    batcher = _batcher(scheduler)
    return batcher.max_len if batcher is not None else loaded.max_positions
