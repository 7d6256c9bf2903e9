"""Loading the frozen LM, and the facts about it that uploads are checked against."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# causal: generate and classify by verbalizer; masked: classify at [MASK];
# encoder (no LM head): classify with a per-task linear head at [MASK]
FAMILIES = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM, "encoder": AutoModel}


def detect_family(config) -> str:
    """From the checkpoint's `architectures`: *ForCausalLM / *LMHeadModel -> causal,
    *ForMaskedLM -> masked, a bare *Model -> encoder."""
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal"
        if arch.endswith("ForMaskedLM"):
            return "masked"
    if archs and all(arch.endswith("Model") for arch in archs):
        return "encoder"
    raise ValueError(
        f"cannot tell whether {archs or 'this model'} is a causal LM, a masked LM or an encoder; "
        "set PTSERVE_MODEL_FAMILY to causal, masked or encoder"
    )


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


def largest_row_norm(weight: torch.Tensor) -> float:
    """The largest L2 norm of a row of `weight`, in float32, a block of rows at a time."""
    return max(float(torch.linalg.vector_norm(block.float(), dim=1).max()) for block in weight.detach().split(8192))


def default_bos_token(tokenizer) -> str | None:
    """The BOS token's text when the tokenizer prepends it by default, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("x")["input_ids"]
    return tokenizer.bos_token if with_special[:1] == [bos] else None


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
    family: str = "causal"  # a key of FAMILIES
    embedding_norm: float | None = None  # largest norm of an input embedding row: bounds prompt rows at upload

    @property
    def vocab_size(self) -> int:
        return self.info["vocab_size"]

    @property
    def mask_token_id(self) -> int | None:
        return getattr(self.tokenizer, "mask_token_id", None)


def load_model(
    name_or_path: str, device: str = "auto", dtype: str = "auto", family: str = "auto", device_map: str | None = None
) -> LoadedModel:
    """`device_map` (e.g. "auto") hands placement to accelerate, which may spread
    the layers over several GPUs; inputs then go to the input embedding's device."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if family == "auto":
        family = detect_family(AutoConfig.from_pretrained(name_or_path))
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose auto or one of {list(FAMILIES)}")
    log.info("loading %s (%s) on %s as %s", name_or_path, family, device_map or dev, dt)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if device_map:
        model = FAMILIES[family].from_pretrained(name_or_path, dtype=dt, device_map=device_map)
        dev = model.get_input_embeddings().weight.device
    else:
        model = FAMILIES[family].from_pretrained(name_or_path, dtype=dt).to(dev)
    model.eval().requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=dev,
        dtype=dt,
        info=describe_model(model, name_or_path),
        max_positions=max_positions(model.config),
        family=family,
        embedding_norm=largest_row_norm(model.get_input_embeddings().weight),
    )
