"""A GGUF file to an ordinary Hugging Face checkpoint (config, tokenizer, model.safetensors).

transformers dequantizes GGUF files on load (any architecture its GGUF support
covers) but will not `save_pretrained` the result, so the weights are moved into
a fresh model of the same class built from the config minus its
`quantization_config`, which saves like any other. Weights are kept in float32:
the dequantized values exactly, so the artifact fingerprint (computed from the
stored embedding matrix) is the same whatever dtype the server later loads in.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise ValueError(f"cannot load {gguf} as a causal LM through transformers' GGUF support: {e}") from e
    config = copy.deepcopy(model.config)
    del config.quantization_config
    with torch.device("meta"):  # no memory, no random init: the GGUF's tensors are assigned next
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    plain.tie_weights()  # assign=True replaced the tied tensors one by one
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
