"""The engine: everything the routes talk to, built once at startup.

It owns the model, the store, the prompt cache, the runner and the scheduler.
Routes call `upload` / `prepare_*` (blocking: store I/O and tokenization, so
they run in a worker thread) and `submit`; they never touch the model.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future

from prompt_store.artifact import artifact_bytes, read_artifact
from prompt_store.errors import InvalidRequest, TaskNotFound
from prompt_store.peft import artifact_from_peft, parse_peft_config
from prompt_store.store import PromptStore, StoredPrompt, check_task_id, open_store
from prompt_store.template import own_length, render
from ptcore.model import LoadedModel, default_bos_token, load_model
from ptcore.task_prompt import TaskPrompt, check_classify_input, task_prompt
from server.engine.backends import make_batch
from server.engine.classify import Classifier
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.slot_backend import SlotBackend
from server.engine.stats import BatchStats
from server.prompt_cache import PromptCache
from server.settings import Settings

log = logging.getLogger(__name__)

_SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "stop", "seed")
# No tokenizer we serve packs more than this many characters into one token of
# ordinary text (English averages about 4), so input longer than
# max_input_tokens * CHARS_PER_TOKEN_BOUND cannot fit and is refused before
# tokenizing, which would cost far more than the refusal.
CHARS_PER_TOKEN_BOUND = 16


class Engine:
    def __init__(self, settings: Settings, loaded: LoadedModel, store: PromptStore):
        self.settings = settings
        self.loaded = loaded
        self.store = store
        self.prompts = PromptCache(store, loaded, settings.prompt_cache_size, settings.max_artifact_bytes)
        self.batch_stats = BatchStats()
        self.batch = make_batch(loaded, settings.engine, bool(settings.device_map), settings.max_running,
                                settings.max_seq_len, settings.max_tokens_in_flight, settings.prefix_cache_size,
                                settings.cuda_graphs, settings.compile)  # fmt: skip
        self.scheduler = Scheduler(self.batch, Classifier(loaded, settings.max_classify_rows), settings.max_batch_size,
                                   settings.max_wait_ms / 1000, self.batch_stats, settings.max_queue)  # fmt: skip

    @classmethod
    def from_settings(cls, settings: Settings, loaded: LoadedModel | None = None) -> Engine:
        if loaded is None:
            loaded = load_model(
                settings.model, settings.device, settings.dtype, settings.model_family, settings.device_map,
                settings.model_cache,
            )  # fmt: skip
        return cls(settings, loaded, open_store(settings.store))

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        self.store.close()

    # -- tasks -------------------------------------------------------------

    def upload(self, task_id: str, data: bytes) -> dict:
        """Check the artifact fully against the served model, then store it.
        Anything wrong raises before the store is touched."""
        check_task_id(task_id)
        artifact = read_artifact(data, self.settings.max_artifact_bytes)
        rows, limit = artifact.embeddings.shape[0], self.settings.max_virtual_tokens
        if rows > limit:
            raise InvalidRequest(f"{rows} prompt rows; this server allows at most {limit}")
        prompt = task_prompt(task_id, 0, artifact, self.loaded)  # fits the model; verbalizers tokenize
        if prompt.labels and len(prompt.labels) > self.settings.max_labels:
            raise InvalidRequest(f"{len(prompt.labels)} labels; this server allows at most {self.settings.max_labels}")
        if prompt.task_type == "generate":
            try:
                self._sampling_params(prompt, {})
                self._check_default_length(prompt)
            except InvalidRequest as e:
                raise InvalidRequest(f"bad 'generation' defaults in the artifact: {e}") from None
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

    def summary(self, task_id: str) -> dict:
        summary = self.store.summary(check_task_id(task_id))
        if summary is None:
            raise TaskNotFound(f"no prompt is stored for task {task_id!r}")
        return summary

    def artifact(self, task_id: str) -> StoredPrompt:
        stored = self.store.get(check_task_id(task_id))
        if stored is None:
            raise TaskNotFound(f"no prompt is stored for task {task_id!r}")
        return stored

    def delete(self, task_id: str) -> None:
        if not self.store.delete(check_task_id(task_id)):
            raise TaskNotFound(f"no prompt is stored for task {task_id!r}")
        self.prompts.drop(task_id)

    # -- inference ---------------------------------------------------------

    def _resolve(self, task_id: str, task_type: str, fields: dict[str, str]) -> tuple[TaskPrompt, list[int]]:
        prompt = self.prompts.get(task_id)
        if prompt.task_type != task_type:
            raise InvalidRequest(f"task {task_id!r} is a {prompt.task_type} task; use its /{prompt.task_type} route")
        chars = sum(len(value) for value in fields.values())
        if chars > self.settings.max_input_tokens * CHARS_PER_TOKEN_BOUND:
            raise InvalidRequest(
                f"input is {chars} characters; the limit is {self.settings.max_input_tokens * CHARS_PER_TOKEN_BOUND} "
                f"({CHARS_PER_TOKEN_BOUND} characters per token of the {self.settings.max_input_tokens}-token "
                "input limit), checked before tokenizing"
            )
        ids = render(prompt.template, self.loaded.tokenizer, fields, self.loaded.vocab_size)
        if len(ids) > self.settings.max_input_tokens:
            raise InvalidRequest(f"rendered input is {len(ids)} tokens; the limit is {self.settings.max_input_tokens}")
        return prompt, ids

    def prepare_generate(self, task_id: str, fields: dict[str, str], overrides: dict) -> Request:
        if self.loaded.family != "causal":
            raise InvalidRequest(
                f"the served model {self.loaded.info['name_or_path']!r} is a {self.loaded.family} model, "
                "not a causal LM: it cannot generate text, only classify"
            )
        prompt, ids = self._resolve(task_id, "generate", fields)
        params = self._sampling_params(prompt, overrides)
        limit = self._position_limit()
        if limit is not None and len(ids) + params.max_new_tokens > limit:
            raise InvalidRequest(
                f"{len(ids)} input tokens + max_new_tokens {params.max_new_tokens} exceed the {limit} positions "
                "a request may use here"
            )
        return Request.generate(prompt, ids, params)

    def _position_limit(self) -> int | None:
        """Input + new tokens of one generate request, at most (None: unbounded)."""
        return self.batch.backend.max_len if self.batch is not None else self.loaded.max_positions

    def _check_default_length(self, prompt: TaskPrompt) -> None:
        """The artifact's own max_new_tokens must leave room for its template, or every
        request that keeps the default would be refused."""
        wanted, limit = prompt.generation.get("max_new_tokens"), self._position_limit()
        if wanted is None or limit is None:
            return
        fixed = own_length(prompt.template, self.loaded.tokenizer, self.loaded.vocab_size)
        if fixed + wanted > limit:
            raise InvalidRequest(
                f"max_new_tokens {wanted} plus the template's own {fixed} tokens exceed the {limit} positions "
                "a request may use here"
            )

    def prepare_classify(self, task_id: str, fields: dict[str, str]) -> Request:
        prompt, ids = self._resolve(task_id, "classify", fields)
        check_classify_input(prompt, ids, self.loaded)
        return Request.classify(prompt, ids)

    def _sampling_params(self, prompt: TaskPrompt, overrides: dict) -> SamplingParams:
        """Request values win over the artifact's `generation` defaults, which win over the server's."""
        chosen = {"max_new_tokens": self.settings.default_max_new_tokens}
        chosen.update({k: v for k, v in prompt.generation.items() if k in _SAMPLING_KEYS and v is not None})
        chosen.update({k: v for k, v in overrides.items() if k in _SAMPLING_KEYS and v is not None})
        stop = chosen.get("stop", ())
        if isinstance(stop, str):
            chosen["stop"] = (stop,)
        elif isinstance(stop, (list, tuple)):
            chosen["stop"] = tuple(stop)
        else:
            raise InvalidRequest(f"stop must be a string or a list of strings, got {stop!r}")
        params = SamplingParams(**chosen)
        if params.max_new_tokens > self.settings.max_new_tokens_limit:
            raise InvalidRequest(
                f"max_new_tokens {chosen['max_new_tokens']} exceeds this server's limit of "
                f"{self.settings.max_new_tokens_limit}"
            )
        return params

    def submit(self, work: Request) -> Future:
        return self.scheduler.submit(work)

    # -- health ------------------------------------------------------------

    def stats(self) -> dict:
        slots = self.batch is not None and isinstance(self.batch.backend, SlotBackend)
        return {
            "batches": self.batch_stats.snapshot(),
            "prompt_cache": self.prompts.stats(),
            "engine": "continuous" if slots else "static",
            "running": self.scheduler.running() if self.batch is not None else None,
            "prefix_cache": self.batch.backend.prefixes.stats() if slots else None,
            "queue_depth": self.scheduler.queue_depth(),
        }
