"""Forward passes over a Hugging Face model's own weights and submodules, with
attention written against the slot KV cache (server/engine/kv_cache.py).

Norms, projections, MLPs and the rotary embedding are the model's modules
and weights; attention is ours, so that each row can read and write its own
slot at its own positions (and, for Llama, projections that read the same
input run as one product, see `pack_linears`). Supported: Llama-style decoders
(model_type llama) and GPT-2; `slot_model_for` returns None for anything else,
and the server then uses the Hugging Face backend (server/engine/hf_backend.py).

A forward pass takes everything that decides tensor shapes as arguments
(`length`: how many cache positions each row reads), and never looks at a
tensor's values on the host. That keeps the decode step capturable in a CUDA
graph and traceable by torch.compile (server/engine/decode_step.py).
"""

from __future__ import annotations

from torch import nn

from server.engine.models.cpu_linear import MKL_ROWS
from server.engine.models.gpt2 import GPT2SlotModel
from server.engine.models.llama import LlamaSlotModel


def slot_model_for(model, packed: bool = True, max_rows: int = MKL_ROWS):
    """A slot forward for this model, or None when its architecture is not covered.
    packed: large CPU products read packed weights (server/engine/models/cpu_linear.py);
    max_rows: the most rows a decode step has (the engine's max_running)."""
    cfg = model.config
    if cfg.model_type == "llama" and hasattr(model, "model") and not getattr(cfg, "sliding_window", None):
        layer = model.model.layers[0]
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        # plain Llama attention and RMSNorm, and plain (not quantized) projections that can be packed
        plain_norm = hasattr(layer.input_layernorm, "variance_epsilon")
        if not hasattr(layer.self_attn, "q_norm") and plain_norm and all(type(m) is nn.Linear for m in linears):
            return LlamaSlotModel(model, packed, max_rows)
    if cfg.model_type == "gpt2" and not cfg.reorder_and_upcast_attn and not cfg.add_cross_attention:
        return GPT2SlotModel(model)
    return None
