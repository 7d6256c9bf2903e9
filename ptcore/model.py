"""Loading the frozen LM, and the facts about it that uploads are checked against."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from ptcore.model_source import DEFAULT_MODEL_CACHE, resolve_model, source_of

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


def avoid_cudnn_attention(device: torch.device) -> None:
    """On CUDA, take cuDNN's kernel out of scaled_dot_product_attention's choices,
    for the whole process.

    PyTorch prefers it on Hopper GPUs for attention with a mask, which is how
    every forward here runs (rows of different lengths; Hugging Face's sdpa
    attention too). cuDNN builds an execution plan for each new shape, tens to
    hundreds of milliseconds, and caches plans per thread: admissions (a new
    batch size or length almost every time), steps that are not CUDA graphs
    (the length grows by one each step) and every new scheduler thread would
    pay it, and the cache grows without bound. The memory-efficient kernel
    takes the same masks with no per-shape setup."""
    if device.type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)
        log.info("cuDNN attention off: its per-shape plans would be rebuilt for nearly every prefill")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto or one of {list(_DTYPES)}")
    return _DTYPES[name]


def embedding_fingerprint(weight: torch.Tensor) -> str:
    """sha256 of the input embedding matrix cast to bfloat16, row-major bytes;
    the first 16 hex digits. Casting first makes fp32 and bf16 copies of one
    checkpoint agree (bf16 of bf16 is itself); a float16 copy does not, having
    been rounded once more, so `describe_model` reads the checkpoint's values."""
    raw = weight.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()[:16]


def _safetensors_files(name_or_path: str) -> list[Path]:
    """The checkpoint's safetensors files: in a local folder, or already in the
    Hugging Face cache (never downloaded here); [] when there are none."""

    def find(filename: str) -> Path | None:
        if Path(name_or_path).is_dir():
            path = Path(name_or_path) / filename
            return path if path.is_file() else None
        try:
            cached = try_to_load_from_cache(name_or_path, filename)
        except ValueError:  # not a repository id either (e.g. a made-up name)
            return None
        return Path(cached) if isinstance(cached, str) else None

    index = find("model.safetensors.index.json")
    if index is not None:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [find(shard) for shard in shards]
        return files if all(files) else []
    single = find("model.safetensors")
    return [single] if single else []


def checkpoint_embedding(model, name_or_path: str) -> torch.Tensor | None:
    """The input embedding matrix as the checkpoint stores it (before any cast
    to the serving dtype), or None when it is not found in safetensors files."""
    weight = model.get_input_embeddings().weight
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]
    for path in _safetensors_files(name_or_path):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                # a checkpoint of another head class prefixes names differently ("bert." or none)
                if any(key == n or key.endswith("." + n) or n.endswith("." + key) for n in names):
                    stored = f.get_tensor(key)
                    if tuple(stored.shape) == tuple(weight.shape):
                        return stored
    return None


def describe_model(model, name_or_path: str) -> dict:
    """The artifact's `base_model` entry for this model. The fingerprint comes
    from the checkpoint's stored embedding values when they can be read, so it
    does not depend on the dtype the model is served in."""
    weight = model.get_input_embeddings().weight
    try:
        stored = checkpoint_embedding(model, name_or_path)
    except (OSError, ValueError, KeyError) as e:
        log.warning("cannot read the embedding matrix from %s's checkpoint: %s", name_or_path, e)
        stored = None
    if stored is None and weight.dtype == torch.float16:
        log.warning(
            "fingerprint of %s computed from its float16 copy (no safetensors checkpoint found): artifacts "
            "made against a float32 or bfloat16 load may be refused as trained on other weights",
            name_or_path,
        )
    source = source_of(name_or_path)
    info = {
        "name_or_path": name_or_path if source is None else source["name"],
        "hidden_size": int(weight.shape[1]),
        "vocab_size": int(weight.shape[0]),
        "fingerprint": embedding_fingerprint(weight if stored is None else stored),
    }
    if source is not None:
        info["source_sha256"] = source["source_sha256"]
    return info


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

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends a generation: from the generation config, the model
        config and the tokenizer."""
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        return frozenset(ids)


def load_model(
    name_or_path: str | None,
    device: str = "auto",
    dtype: str = "auto",
    family: str = "auto",
    device_map: str | None = None,
    model_cache: str = DEFAULT_MODEL_CACHE,
) -> LoadedModel:
    """`name_or_path`: a model id or directory, a GGUF file (converted once into
    `model_cache`), or None for the default model (see ptcore/model_source.py).
    `device_map` (e.g. "auto") hands placement to accelerate, which may spread
    the layers over several GPUs; inputs then go to the input embedding's device."""
    name_or_path = resolve_model(name_or_path, model_cache)
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
    avoid_cudnn_attention(dev)
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
