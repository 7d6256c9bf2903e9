"""The prompt artifact: one safetensors file per task version.

- tensor `prompt_embeddings`: [m, hidden_size], float32 / float16 / bfloat16;
- optional tensors `head.weight` [num_labels, hidden_size] and `head.bias`
  [num_labels]: a per-task linear classifier, for encoders without an LM head
  (row i scores the i-th label of `labels`);
- metadata key `head_pooling` (with a head): what the head reads: "mask" (the
  last hidden state at the template's [MASK]; the default when absent) or
  "mean" (the mean of the last hidden states over every position of the
  rendered sequence: pseudo tokens, special tokens and the input alike);
- header metadata key `ptserve`: JSON with format_version, task_type, template,
  labels (classify), base_model {name_or_path, hidden_size, vocab_size,
  fingerprint?} and optional keys that are kept and ignored.

`read_artifact` checks everything that can be checked without the model;
`check_fits_model` checks the rest against the served model.

Bounds for hostile files: JSON documents (the header, the metadata, a PEFT
config) nest at most MAX_JSON_DEPTH levels and hold no lone surrogate; prompt
rows must stay finite in the served dtype and no row's norm may exceed
MAX_NORM_RATIO times the largest norm of the model's input embedding rows.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ptcore.errors import PayloadTooLarge

from .errors import ArtifactError, TemplateError
from .template import Template, lone_surrogate, parse_template

TENSOR_NAME = "prompt_embeddings"
HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
METADATA_KEY = "ptserve"
FORMAT_VERSION = 1
TASK_TYPES = ("generate", "classify")
HEAD_POOLINGS = ("mask", "mean")  # what an encoder head reads; "mask" when absent
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 32  # real headers and metadata nest 3-4 levels
# Trained soft prompts sit within a few times the norms of real token embeddings (an
# untrained P-tuning encoder with N(0, 1) weights, in the PEFT tests: up to ~300 times);
# rows 1000 times the largest embedding norm are refused: far past any of those, and
# long before the maths breaks (1e38 rows overflow to Inf and give NaN logits).
MAX_NORM_RATIO = 1000


@dataclass(frozen=True)
class PromptArtifact:
    embeddings: torch.Tensor  # [m, hidden_size]
    meta: dict = field(default_factory=dict)
    head: tuple[torch.Tensor, torch.Tensor] | None = None  # weight [L, hidden_size], bias [L]

    @property
    def task_type(self) -> str:
        return self.meta["task_type"]

    @property
    def template(self) -> Template:
        return parse_template(self.meta["template"])

    @property
    def labels(self) -> dict[str, str] | None:
        return self.meta.get("labels")

    @property
    def head_pooling(self) -> str:
        return self.meta.get("head_pooling", "mask")

    @property
    def base_model(self) -> dict:
        return self.meta["base_model"]


def load_json(raw: bytes | str, what: str):
    """json.loads for an uploaded document, refusing what breaks later steps: nesting
    deeper than MAX_JSON_DEPTH (a RecursionError here, or in the response's
    serializer) and lone surrogates ("\\ud800" is valid JSON but no text: neither
    UTF-8 nor a tokenizer takes it). Syntax errors raise json.JSONDecodeError."""
    try:
        doc = json.loads(raw)
    except RecursionError:
        raise ArtifactError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep") from None
    pending = [(doc, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, str):
            surrogate = lone_surrogate(value)
            if surrogate is not None:
                raise ArtifactError(f"{what} holds a lone surrogate {surrogate[1]!r} in {value[:40]!r}: not text")
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ArtifactError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep")
            children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            pending.extend((child, depth + 1) for child in children)
    return doc


def read_header(data: bytes) -> dict:
    """The JSON header of a safetensors file, without loading any tensor."""
    if len(data) < 8:
        raise ArtifactError("not a safetensors file: fewer than 8 bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise ArtifactError(f"not a safetensors file: header length {n} exceeds {MAX_HEADER_BYTES} bytes")
    if 8 + n > len(data):
        raise ArtifactError(f"not a safetensors file: header length {n} runs past the end of the {len(data)} bytes")
    try:
        header = load_json(data[8 : 8 + n], "safetensors header")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"not a safetensors file: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ArtifactError("not a safetensors file: header is not a JSON object")
    return header


def read_meta(header: dict) -> dict:
    """The `ptserve` metadata document of a parsed header, checked for shape."""
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ArtifactError("safetensors '__metadata__' must be an object of strings")
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        raise ArtifactError(f"safetensors metadata has no '{METADATA_KEY}' key")
    if not isinstance(raw, str):
        raise ArtifactError(f"metadata '{METADATA_KEY}' must be a JSON string")
    try:
        meta = load_json(raw, f"metadata '{METADATA_KEY}'")
    except json.JSONDecodeError as e:
        raise ArtifactError(f"metadata '{METADATA_KEY}' is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"metadata '{METADATA_KEY}' must be a JSON object")
    _check_meta(meta)
    return meta


def _check_meta(meta: dict) -> None:
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version != FORMAT_VERSION:
        raise ArtifactError(f"format_version must be the integer {FORMAT_VERSION}, got {version!r}")
    if meta.get("task_type") not in TASK_TYPES:
        raise ArtifactError(f"task_type must be one of {list(TASK_TYPES)}, got {meta.get('task_type')!r}")
    try:
        template = parse_template(meta.get("template"))
    except TemplateError as e:
        raise ArtifactError(f"bad template: {e}") from None
    if template.num_virtual_tokens == 0:
        raise ArtifactError(f"template {meta['template']!r} has no [P:n] pseudo tokens")
    labels = meta.get("labels")
    if meta["task_type"] == "classify":
        if not isinstance(labels, dict) or not labels:
            raise ArtifactError("a classify artifact needs 'labels': a non-empty object of label -> verbalizer text")
        for name, verbalizer in labels.items():
            if not name or not isinstance(verbalizer, str) or not verbalizer:
                raise ArtifactError(f"label {name!r}: verbalizer must be a non-empty string")
    elif labels is not None:
        raise ArtifactError("'labels' is only allowed for task_type 'classify'")
    base = meta.get("base_model")
    if not isinstance(base, dict):
        raise ArtifactError("'base_model' must be an object with hidden_size and vocab_size")
    for key in ("hidden_size", "vocab_size"):
        if not isinstance(base.get(key), int) or isinstance(base[key], bool) or base[key] < 1:
            raise ArtifactError(f"base_model.{key} must be a positive integer, got {base.get(key)!r}")
    pooling = meta.get("head_pooling")
    if pooling is not None and pooling not in HEAD_POOLINGS:
        raise ArtifactError(f"head_pooling must be one of {list(HEAD_POOLINGS)}, got {pooling!r}")
    gen = meta.get("generation")
    if gen is not None and not isinstance(gen, dict):
        raise ArtifactError("'generation' must be an object of default sampling parameters")


def read_artifact(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> PromptArtifact:
    """Parse and check artifact bytes; raise ArtifactError saying what is wrong."""
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"artifact is {len(data)} bytes; the limit is {max_bytes}")
    header = read_header(data)
    if TENSOR_NAME not in header:
        names = sorted(k for k in header if k != "__metadata__")
        raise ArtifactError(f"safetensors file has no tensor named '{TENSOR_NAME}' (has {names})")
    meta = read_meta(header)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises assorted types for malformed files
        raise ArtifactError(f"not a valid safetensors file: {e}") from None
    emb = tensors[TENSOR_NAME]
    _check_embeddings(emb, meta)
    head = None
    if HEAD_WEIGHT in tensors or HEAD_BIAS in tensors:
        if HEAD_WEIGHT not in tensors or HEAD_BIAS not in tensors:
            raise ArtifactError(f"a head needs both '{HEAD_WEIGHT}' and '{HEAD_BIAS}'")
        head = (tensors[HEAD_WEIGHT], tensors[HEAD_BIAS])
        _check_head(head, meta)
    return PromptArtifact(embeddings=emb, meta=meta, head=head)


def _check_head(head: tuple[torch.Tensor, torch.Tensor], meta: dict) -> None:
    weight, bias = head
    labels = meta.get("labels") or {}
    want_w, want_b = [len(labels), meta["base_model"]["hidden_size"]], [len(labels)]
    if meta["task_type"] != "classify":
        raise ArtifactError("head tensors are only allowed for task_type 'classify'")
    if list(weight.shape) != want_w or list(bias.shape) != want_b:
        raise ArtifactError(
            f"head shapes {list(weight.shape)} / {list(bias.shape)} must be {want_w} / {want_b} "
            "(one row per label, hidden_size columns)"
        )
    for name, t in ((HEAD_WEIGHT, weight), (HEAD_BIAS, bias)):
        if t.dtype not in FLOAT_DTYPES or not torch.isfinite(t).all():
            raise ArtifactError(f"'{name}' must be a finite float32, float16 or bfloat16 tensor")


def _check_embeddings(emb: torch.Tensor, meta: dict) -> None:
    if emb.dim() != 2:
        raise ArtifactError(f"'{TENSOR_NAME}' must be 2-D [m, hidden_size], got shape {list(emb.shape)}")
    if emb.dtype not in FLOAT_DTYPES:
        raise ArtifactError(f"'{TENSOR_NAME}' must be float32, float16 or bfloat16, got {emb.dtype}")
    if not torch.isfinite(emb).all():
        raise ArtifactError(f"'{TENSOR_NAME}' contains NaN or Inf")
    m = parse_template(meta["template"]).num_virtual_tokens
    if emb.shape[0] != m:
        raise ArtifactError(
            f"'{TENSOR_NAME}' has {emb.shape[0]} rows but template {meta['template']!r} has {m} pseudo tokens"
        )
    hidden = meta["base_model"]["hidden_size"]
    if emb.shape[1] != hidden:
        raise ArtifactError(f"'{TENSOR_NAME}' has {emb.shape[1]} columns but base_model.hidden_size is {hidden}")


def check_fits_model(
    artifact: PromptArtifact,
    hidden_size: int,
    vocab_size: int,
    fingerprint: str | None,
    dtype: torch.dtype | None = None,
    embedding_norm: float | None = None,
) -> None:
    """Refuse an artifact trained for a different model than the one served, or
    whose rows break the maths: not finite in the served `dtype`, or a row norm
    above MAX_NORM_RATIO × `embedding_norm` (the largest norm of the model's
    input embedding rows)."""
    base = artifact.base_model
    if artifact.embeddings.shape[1] != hidden_size:
        raise ArtifactError(
            f"prompt hidden size {artifact.embeddings.shape[1]} does not match the served model's {hidden_size}"
        )
    if base["vocab_size"] != vocab_size:
        raise ArtifactError(
            f"base_model.vocab_size {base['vocab_size']} does not match the served model's {vocab_size}"
        )
    theirs = base.get("fingerprint")
    if theirs is not None and fingerprint is not None and theirs != fingerprint:
        raise ArtifactError(
            f"base_model.fingerprint {theirs} does not match the served model's {fingerprint}: "
            "the prompt was trained on other weights"
        )
    emb = artifact.embeddings
    if dtype is not None and not torch.isfinite(emb.to(dtype)).all():
        largest = float(emb.double().abs().max())
        raise ArtifactError(
            f"'{TENSOR_NAME}' overflows {str(dtype).removeprefix('torch.')}, the served model's dtype "
            f"(largest magnitude {largest:.3g})"
        )
    if embedding_norm is not None:
        norms = emb.double().norm(dim=1)  # [m]; float64, so that rows of 1e38 do not overflow to inf
        worst = int(norms.argmax())
        if norms[worst] > MAX_NORM_RATIO * embedding_norm:
            raise ArtifactError(
                f"'{TENSOR_NAME}' row {worst} has norm {float(norms[worst]):.3g}, more than {MAX_NORM_RATIO} × "
                f"the largest norm of the served model's input embedding rows ({embedding_norm:.3g})"
            )


def make_artifact(
    embeddings: torch.Tensor,
    *,
    template: str,
    task_type: str,
    base_model: dict,
    labels: dict[str, str] | None = None,
    head: tuple[torch.Tensor, torch.Tensor] | None = None,
    **optional,
) -> PromptArtifact:
    """Build a checked artifact from a [m, hidden_size] tensor.

    `base_model` needs hidden_size and vocab_size (and may carry name_or_path and
    fingerprint; `ptcore.model.describe_model` returns one for a loaded model).
    `head`: (weight [L, H], bias [L]) of a per-task classifier, for encoder models.
    Extra keyword arguments (task_id, generation, description, metrics...) go into
    the metadata as they are.
    """
    meta = {
        "format_version": FORMAT_VERSION,
        "task_type": task_type,
        "template": template,
        "base_model": dict(base_model),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **optional,
    }
    if labels is not None:
        meta["labels"] = dict(labels)
    _check_meta(meta)
    emb = embeddings.detach().cpu().contiguous()
    _check_embeddings(emb, meta)
    if head is not None:
        head = tuple(t.detach().cpu().contiguous() for t in head)
        _check_head(head, meta)
    return PromptArtifact(embeddings=emb, meta=meta, head=head)


def artifact_bytes(artifact: PromptArtifact) -> bytes:
    tensors = {TENSOR_NAME: artifact.embeddings.contiguous()}
    if artifact.head is not None:
        tensors[HEAD_WEIGHT], tensors[HEAD_BIAS] = (t.contiguous() for t in artifact.head)
    return st_save(tensors, metadata={METADATA_KEY: json.dumps(artifact.meta)})


def save_artifact(artifact: PromptArtifact, path: str | Path) -> None:
    Path(path).write_bytes(artifact_bytes(artifact))


def load_artifact(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> PromptArtifact:
    return read_artifact(Path(path).read_bytes(), max_bytes=max_bytes)


def summarize(task_id: str, version: int, header: dict) -> dict:
    """The public summary of a stored task, from its safetensors header alone."""
    meta = read_meta(header)
    return {
        "task_id": task_id,
        "version": version,
        "task_type": meta["task_type"],
        "num_virtual_tokens": parse_template(meta["template"]).num_virtual_tokens,
        "template": meta["template"],
        "labels": meta.get("labels"),
        "has_head": HEAD_WEIGHT in header,
        "base_model": meta["base_model"],
        "created_at": meta.get("created_at"),
        "description": meta.get("description"),
        "metrics": meta.get("metrics"),  # a trained prompt's figures (ptuning/train.py), if any
    }
