"""Conversion between PEFT prompt-learning adapters and ptserve artifacts.

PEFT `PROMPT_TUNING` and `P_TUNING` adapters for causal LMs save a folder with
`adapter_config.json` and `adapter_model.safetensors`, whose tensor
`prompt_embeddings` [m, H] is the table (for P_TUNING, the encoder's output).
PEFT puts the m virtual tokens before everything the tokenizer produces, so
the template is `[P:m]{input}`, or `[P:m]<bos>{input}` when the tokenizer
adds a BOS token by default (`<bos>` standing for that token's text).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from .artifact import TENSOR_NAME, PromptArtifact, load_json, make_artifact
from .errors import ArtifactError
from .template import Field, Literal, Pseudo

PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def peft_template(m: int, bos_token: str | None) -> str:
    """`bos_token`: the BOS text when the tokenizer adds one by default, else None."""
    return f"[P:{m}]{bos_token or ''}{{input}}"


def parse_peft_config(raw: bytes | str) -> dict:
    try:
        config = load_json(raw, CONFIG_FILE)  # bounded depth, no lone surrogates
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{CONFIG_FILE} must be a JSON object")
    return config


def artifact_from_peft(config: dict, weights: bytes, *, base_model: dict, bos_token: str | None) -> PromptArtifact:
    """A generate-task artifact from a PEFT adapter's config and weights bytes."""
    for key in ("num_virtual_tokens", "token_dim"):
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ArtifactError(f"{CONFIG_FILE}: {key} must be a positive integer, got {value!r}")
    peft_type = config.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise ArtifactError(f"peft_type {peft_type!r} is not one ptserve imports; it takes {list(PEFT_TYPES)}")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise ArtifactError(f"task_type {config['task_type']!r}: only CAUSAL_LM prompt adapters can be imported")
    if config.get("num_transformer_submodules", 1) != 1:
        raise ArtifactError("encoder-decoder adapters (num_transformer_submodules != 1) cannot be imported")
    try:
        tensors = st_load(weights)
    except Exception as e:  # safetensors raises assorted types for malformed files
        raise ArtifactError(f"{WEIGHTS_FILE} is not a valid safetensors file: {e}") from None
    if TENSOR_NAME not in tensors:
        raise ArtifactError(f"{WEIGHTS_FILE} has no tensor '{TENSOR_NAME}' (has {sorted(tensors)})")
    rows = tensors[TENSOR_NAME]
    m = config.get("num_virtual_tokens")
    if rows.dim() != 2 or rows.shape[0] != m:
        raise ArtifactError(f"'{TENSOR_NAME}' has shape {list(rows.shape)}; num_virtual_tokens is {m}")
    if config.get("token_dim") not in (None, rows.shape[1]):
        raise ArtifactError(f"token_dim {config['token_dim']} does not match the table's {rows.shape[1]} columns")
    return make_artifact(
        rows,
        template=peft_template(m, bos_token),
        task_type="generate",
        base_model=base_model,
        description=f"imported from a PEFT {peft_type} adapter",
        peft={k: config.get(k) for k in ("peft_type", "base_model_name_or_path", "peft_version")},
    )


def export_peft(artifact: PromptArtifact, directory: str | Path, bos_token: str | None) -> Path:
    """Write a PEFT PROMPT_TUNING folder that `PeftModel.from_pretrained` loads.
    Only prefix-only templates (`[P:m]{input}`, or `[P:m]<bos>{input}` where the
    tokenizer adds that BOS itself) have a PEFT equivalent."""
    m = artifact.embeddings.shape[0]
    if artifact.task_type != "generate":
        raise ArtifactError("only generate tasks export to PEFT (a CAUSAL_LM prompt has no labels)")
    # PEFT feeds [virtual tokens] + what the tokenizer gives, BOS included when it adds one
    expected = (Pseudo(m), Literal(bos_token), Field("input")) if bos_token else (Pseudo(m), Field("input"))
    if artifact.template.segments != expected:
        raise ArtifactError(
            f"template {artifact.template.source!r} has no PEFT equivalent for this tokenizer: PEFT places all "
            f"virtual tokens before the tokenized input, i.e. {peft_template(m, bos_token)!r}"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": m,
        "token_dim": int(artifact.embeddings.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": None,
        "num_layers": None,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "base_model_name_or_path": artifact.base_model.get("name_or_path"),
        "inference_mode": True,
        "revision": None,
        "auto_mapping": None,
        "modules_to_save": None,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file({TENSOR_NAME: artifact.embeddings.to(torch.float32).contiguous()}, directory / WEIGHTS_FILE)
    return directory
