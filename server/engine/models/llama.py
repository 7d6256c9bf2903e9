"""Llama's forward pass over its own weights, with slot-cache attention and
fewer kernels per layer than Hugging Face's (see LlamaSlotModel)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from server.engine.models.cpu_linear import MKL_ROWS, Linear
from server.engine.models.slot_attention import SlotAttention


def pack_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight matrix (and bias) for linears that read the same input, so that
    one matrix product does the work of several."""
    weight = pack([m.weight for m in linears])
    bias = pack([m.bias for m in linears]) if linears[0].bias is not None else None
    return weight, bias


def pack(params: list[nn.Parameter]) -> torch.Tensor:
    """`params` stacked along dim 0 in one tensor. Each parameter becomes a view
    of its part, so no memory is added and its module computes what it did.
    Parameters packed before give back their tensor, without a copy. Moving or
    casting the model afterwards would give each parameter its own copy again,
    so this is done once the model sits on its device in its dtype."""
    first = params[0]
    offset = first.storage_offset()
    for p in params:
        same_storage = p.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if not (same_storage and p.is_contiguous() and p.storage_offset() == offset):
            break
        offset += p.numel()
    else:  # already one after another in one storage
        return first.as_strided((sum(p.shape[0] for p in params), *first.shape[1:]), first.stride())
    whole = torch.cat(params)
    start = 0
    for p in params:
        p.data = whole[start : start + p.shape[0]]
        start += p.shape[0]
    return whole


class LlamaSlotModel:
    """Per layer: one product for q, k and v, rotary position on q and k
    together, one product for the MLP's gate and up projections, and each
    RMSNorm as one fused kernel. The rotary tables, the norms' weights, the
    activation and the output projections are the model's.

    Kernels per layer matter: a small-batch decode step is mostly launch cost
    (bench/step_ops.py counts them). F.rms_norm gives Llama's norm bit for bit
    in float32; in bfloat16/float16 it rounds once where Llama's rounds twice."""

    def __init__(self, model, packed: bool = True, max_rows: int = MKL_ROWS):
        """packed: the products read packed copies of their weights on the CPU
        (cpu_linear.py); max_rows: the most rows a decode step has."""
        self.model = model
        self.inner = model.model
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        with torch.no_grad():
            attns, mlps = [x.self_attn for x in self.inner.layers], [x.mlp for x in self.inner.layers]
            qkv = [pack_linears([a.q_proj, a.k_proj, a.v_proj]) for a in attns]
            gate_up = [pack_linears([m.gate_proj, m.up_proj]) for m in mlps]
            self.qkv = [Linear(*wb, packed, max_rows=max_rows) for wb in qkv]
            self.o = [Linear(a.o_proj.weight, a.o_proj.bias, packed, max_rows=max_rows) for a in attns]
            self.gate_up = [Linear(*wb, packed, dnn=True, max_rows=max_rows) for wb in gate_up]
            self.down = [Linear(m.down_proj.weight, m.down_proj.bias, packed, max_rows=max_rows) for m in mlps]
        # "dynamic" rotary scaling compares the largest position with a cached length on the host
        self.capturable = "dynamic" not in str(getattr(self.inner.rotary_emb, "rope_type", "default"))

    def hidden(self, x: torch.Tensor, attention: SlotAttention) -> torch.Tensor:
        """x: [B, T, H] input embeddings -> [B, T, H] final hidden states (before the LM head)."""
        cos, sin = self.inner.rotary_emb(x, attention.positions)
        cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, hd]: broadcast over heads
        # Llama's rotate_half(x) * sin is roll(x, hd/2) * (sin with its first half negated):
        # the same products, with the negation and the concatenation paid once per step
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        B, T, _ = x.shape
        D, qk_heads = self.head_dim, self.heads + self.kv_heads
        for i, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            qkv = self.qkv[i](rms_norm(layer.input_layernorm, x)).view(B, T, -1, D).transpose(1, 2)
            qk = qkv[:, :qk_heads]
            qk = qk * cos + qk.roll(half, dims=-1) * sin  # rotary position, on q and k at once
            q, k, v = qk[:, : self.heads], qk[:, self.heads :], qkv[:, qk_heads:]
            x = x + self.o[i](attention(i, q, k, v, attn.scaling))
            gate, up = self.gate_up[i](rms_norm(layer.post_attention_layernorm, x)).chunk(2, dim=-1)
            x = x + self.down[i](layer.mlp.act_fn(gate) * up)
        return rms_norm(self.inner.norm, x)


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama RMSNorm module's computation in one kernel."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
