"""Managing tasks: upload (checked against the served model), list, read, delete.

Every method blocks (store I/O), so the routes run them in a worker thread.
"""

from __future__ import annotations

import logging

from prompt_store.artifact import artifact_bytes, read_artifact
from prompt_store.check import load_stored
from prompt_store.peft import artifact_from_peft, parse_peft_config
from prompt_store.store import PromptStore, StoredPrompt, check_task_id
from ptcore.errors import TaskNotFound
from ptcore.model import LoadedModel, default_bos_token
from ptcore.task_prompt import check_limits, task_prompt
from server.engine.stats import BatchStats
from server.inference import Inference
from server.prompt_cache import PromptCache, not_found
from server.settings import Settings

log = logging.getLogger(__name__)


class TaskManager:
    def __init__(self, settings: Settings, loaded: LoadedModel, store: PromptStore, prompts: PromptCache,
                 inference: Inference, stats: BatchStats):  # fmt: skip
        """inference: checks a generate task's defaults against the server's limits.
        stats: the engine's counts, whose per-task entries go with a deleted task."""
        self.settings = settings
        self.loaded = loaded
        self.store = store
        self.prompts = prompts
        self.inference = inference
        self.stats = stats

    def upload(self, task_id: str, data: bytes) -> dict:
        """Check the artifact fully against the served model, then store it.
        Anything wrong raises before the store is touched. -> the task's summary."""
        check_task_id(task_id)
        artifact = read_artifact(data, self.settings.max_artifact_bytes)
        check_limits(artifact.embeddings.shape[0], len(artifact.labels or {}), self.settings.max_virtual_tokens,
                     self.settings.max_labels)  # fmt: skip
        prompt = task_prompt(task_id, 0, artifact, self.loaded)  # fits the model; verbalizers tokenize
        if prompt.task_type == "generate":
            self.inference.check_generation_defaults(prompt)
        summary = self.store.put(task_id, data)
        log.info("stored task %s version %d", task_id, summary["version"])
        return summary

    def upload_peft(self, task_id: str, config: bytes, weights: bytes) -> dict:
        """Convert a PEFT prompt-tuning / P-tuning adapter for the served model, then upload it."""
        check_task_id(task_id)
        artifact = artifact_from_peft(
            parse_peft_config(config),
            weights,
            base_model=self.loaded.info,
            bos_token=default_bos_token(self.loaded.tokenizer),
        )
        return self.upload(task_id, artifact_bytes(artifact))

    def list(self) -> list[dict]:
        """The summary of every stored task."""
        return self.store.list()

    def summary(self, task_id: str) -> dict:
        summary = self.store.summary(task_id)  # the store checks the id
        if summary is None:
            raise TaskNotFound(f"no prompt is stored for task {task_id!r}")
        return summary

    def versions(self, task_id: str) -> list[dict]:
        """The summary of every version the store keeps, newest first."""
        versions = self.store.versions(task_id)  # the store checks the id
        if versions is None:
            raise TaskNotFound(f"no prompt is stored for task {task_id!r}")
        return versions

    def artifact(self, task_id: str, version: int | None = None) -> StoredPrompt:
        """The latest version's artifact (or a kept `version`'s), as uploaded; a damaged one
        is a 503 (StoredPromptDamaged), so it is never handed out to be uploaded again."""
        stored = self.store.get(task_id, version)
        if stored is None:
            raise not_found(self.store, task_id, version)
        load_stored(stored, len(stored.data))
        return stored

    def delete(self, task_id: str) -> None:
        if not self.store.delete(task_id):
            raise TaskNotFound(f"no prompt is stored for task {task_id!r}")
        self.prompts.drop(task_id)
        self.stats.forget(task_id)  # /metrics does not grow with deleted tasks
