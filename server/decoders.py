"""Forward passes over a Hugging Face model's own weights and submodules, with
attention written against the slot KV cache (server/kv_cache.py).

Norms, projections, MLPs and the rotary embedding are the model's modules
and weights; attention is ours, so that each row can read and write its own
slot at its own positions (and, for Llama, projections that read the same
input run as one product, see `pack_linears`). Supported: Llama-style decoders
(model_type llama) and GPT-2; `decoder_for` returns None for anything else,
and the server then uses the plain Hugging Face runner.

A forward pass takes everything that decides tensor shapes as arguments
(`length`: how many cache positions each row reads), and never looks at a
tensor's values on the host. That keeps the decode step capturable in a CUDA
graph and traceable by torch.compile (server/decode_step.py).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .kv_cache import SlotKVCache


class SlotAttention:
    """Where one forward pass's tokens live in the cache, shared by all its layers.

    slots: None when row b is slot b (the decode step: the cache is read as a
    view), else a [B] tensor of slot ids (prefill: those slots are gathered).
    positions: [B, T]. length: each row reads positions 0..length-1, which must
    cover every position in `positions`."""

    def __init__(self, cache: SlotKVCache, slots: torch.Tensor | None, positions: torch.Tensor, length: int):
        B = positions.shape[0]
        self.cache = cache
        self.slots = slots
        self.slot_ids = torch.arange(B, device=positions.device) if slots is None else slots
        self.positions = positions
        self.length = length
        # a query sees its own row's keys at positions <= its own: [B, T, length]
        self.mask = torch.arange(length, device=positions.device)[None, None, :] <= positions[:, :, None]

    def __call__(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        """q: [B, heads, T, hd]; k, v: [B, kv_heads, T, hd] -> [B, T, heads * hd]."""
        self.cache.write(layer, self.slot_ids, self.positions, k, v)
        B, H, T, D = q.shape
        if self.slots is None:
            keys, values = self.cache.read(layer, B, self.length)
        else:
            keys, values = self.cache.gather(layer, self.slots, self.length)  # [B, kv_heads, length, hd]
        group = H // keys.shape[1]
        # grouped-query attention without copying keys: the `group` query heads
        # that share a key head become extra query rows of that head
        q = q.reshape(B, H // group, group * T, D)
        mask = self.mask[:, None].expand(B, group, T, self.length).reshape(B, 1, group * T, self.length)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
        return out.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)


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


class LlamaDecoder:
    """Per layer: one product for q, k and v, rotary position on q and k
    together, one product for the MLP's gate and up projections, and each
    RMSNorm as one fused kernel. The rotary tables, the norms' weights, the
    activation and the output projections are the model's.

    Kernels per layer matter: a small-batch decode step is mostly launch cost
    (bench/step_ops.py counts them). F.rms_norm gives Llama's norm bit for bit
    in float32; in bfloat16/float16 it rounds once where Llama's rounds twice."""

    def __init__(self, model):
        self.model = model
        self.inner = model.model
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        with torch.no_grad():
            attns, mlps = [x.self_attn for x in self.inner.layers], [x.mlp for x in self.inner.layers]
            self.qkv = [pack_linears([a.q_proj, a.k_proj, a.v_proj]) for a in attns]
            self.gate_up = [pack_linears([m.gate_proj, m.up_proj]) for m in mlps]
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
            qkv = F.linear(rms_norm(layer.input_layernorm, x), *self.qkv[i]).view(B, T, -1, D).transpose(1, 2)
            qk = qkv[:, :qk_heads]
            qk = qk * cos + qk.roll(half, dims=-1) * sin  # rotary position, on q and k at once
            q, k, v = qk[:, : self.heads], qk[:, self.heads :], qkv[:, qk_heads:]
            x = x + attn.o_proj(attention(i, q, k, v, attn.scaling))
            mlp = layer.mlp
            gate, up = F.linear(rms_norm(layer.post_attention_layernorm, x), *self.gate_up[i]).chunk(2, dim=-1)
            x = x + mlp.down_proj(mlp.act_fn(gate) * up)
        return rms_norm(self.inner.norm, x)


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Llama RMSNorm module's computation in one kernel."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


class GPT2Decoder:
    def __init__(self, model):
        self.model = model
        self.inner = model.transformer
        cfg = model.config
        self.num_layers = cfg.n_layer
        self.heads = self.kv_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.capturable = True

    def hidden(self, x: torch.Tensor, attention: SlotAttention) -> torch.Tensor:
        x = x + self.inner.wpe(attention.positions)
        B, T, H = x.shape
        for i, block in enumerate(self.inner.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(H, dim=2)
            q, k, v = (t.view(B, T, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
            x = x + attn.c_proj(attention(i, q, k, v, attn.scaling))
            x = x + block.mlp(block.ln_2(x))
        return self.inner.ln_f(x)


def decoder_for(model):
    """A slot-cache decoder for this model, or None when its architecture is not covered."""
    cfg = model.config
    if cfg.model_type == "llama" and hasattr(model, "model") and not getattr(cfg, "sliding_window", None):
        layer = model.model.layers[0]
        linears = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                   layer.mlp.up_proj)  # fmt: skip
        # plain Llama attention and RMSNorm, and plain (not quantized) projections that can be packed
        plain_norm = hasattr(layer.input_layernorm, "variance_epsilon")
        if not hasattr(layer.self_attn, "q_norm") and plain_norm and all(type(m) is nn.Linear for m in linears):
            return LlamaDecoder(model)
    if cfg.model_type == "gpt2" and not cfg.reorder_and_upcast_attn and not cfg.add_cross_attention:
        return GPT2Decoder(model)
    return None
