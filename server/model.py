"""Loading the frozen LM, and the facts about it that uploads are checked against."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto or one of {list(_DTYPES)}")
    return _DTYPES[name]


def embedding_fingerprint(weight: torch.Tensor) -> str:
    """sha256 of the input embedding matrix cast to bfloat16, row-major bytes;
    the first 16 hex digits. Casting first makes fp32 and bf16 copies of one
    checkpoint agree."""
    raw = weight.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()[:16]


def describe_model(model, name_or_path: str) -> dict:
    """The artifact's `base_model` entry for this model."""
    weight = model.get_input_embeddings().weight
    return {
        "name_or_path": name_or_path,
        "hidden_size": int(weight.shape[1]),
        "vocab_size": int(weight.shape[0]),
        "fingerprint": embedding_fingerprint(weight),
    }


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    info: dict  # describe_model(): name_or_path, hidden_size, vocab_size, fingerprint
    max_positions: int | None

    @property
    def vocab_size(self) -> int:
        return self.info["vocab_size"]


def load_model(name_or_path: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    log.info("loading %s on %s as %s", name_or_path, dev, dt)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dt)
    model.to(dev).eval().requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=dev,
        dtype=dt,
        info=describe_model(model, name_or_path),
        max_positions=max_positions(model.config),
    )
