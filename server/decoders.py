"""Forward passes over a Hugging Face model's own weights and submodules, with
attention written against the slot KV cache (server/kv_cache.py).

Norms, projections, MLPs and the rotary embedding are the model's modules,
called as they are; only attention is ours, so that each row can read and
write its own slot at its own positions. Supported: Llama-style decoders
(model_type llama) and GPT-2; `decoder_for` returns None for anything else,
and the server then uses the plain Hugging Face runner.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .kv_cache import SlotKVCache


def slot_attention(q, k, v, cache: SlotKVCache, layer: int, slots, positions: torch.Tensor, scale: float):
    """q: [B, heads, T, hd]; k, v: [B, kv_heads, T, hd]; positions: [B, T].
    Writes k, v at `positions`, then each query attends to its row's
    positions <= its own. `slots`: an int n (rows are slots 0..n-1) or a [B] tensor."""
    slot_ids = torch.arange(slots, device=positions.device) if isinstance(slots, int) else slots
    cache.write(layer, slot_ids, positions, k, v)
    length = int(positions.max()) + 1
    keys, values = cache.read(layer, slots, length)  # [B, kv_heads, length, hd]
    if keys.shape[1] != q.shape[1]:  # grouped-query attention
        repeat = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(repeat, dim=1), values.repeat_interleave(repeat, dim=1)
    mask = torch.arange(length, device=q.device)[None, None, :] <= positions[:, :, None]  # [B, T, length]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None], scale=scale)
    B, H, T, D = out.shape
    return out.transpose(1, 2).reshape(B, T, H * D)


class LlamaDecoder:
    def __init__(self, model):
        self.model = model
        self.inner = model.model
        cfg = model.config
        self.num_layers = cfg.num_hidden_layers
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def hidden(self, x: torch.Tensor, positions: torch.Tensor, slots, cache: SlotKVCache) -> torch.Tensor:
        """x: [B, T, H] input embeddings -> [B, T, H] final hidden states (before the LM head)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cos, sin = self.inner.rotary_emb(x, positions)
        B, T, _ = x.shape
        for i, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            x = x + attn.o_proj(slot_attention(q, k, v, cache, i, slots, positions, attn.scaling))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.inner.norm(x)


class GPT2Decoder:
    def __init__(self, model):
        self.model = model
        self.inner = model.transformer
        cfg = model.config
        self.num_layers = cfg.n_layer
        self.heads = self.kv_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head

    def hidden(self, x: torch.Tensor, positions: torch.Tensor, slots, cache: SlotKVCache) -> torch.Tensor:
        x = x + self.inner.wpe(positions)
        B, T, H = x.shape
        for i, block in enumerate(self.inner.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(H, dim=2)
            q, k, v = (t.view(B, T, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
            x = x + attn.c_proj(slot_attention(q, k, v, cache, i, slots, positions, attn.scaling))
            x = x + block.mlp(block.ln_2(x))
        return self.inner.ln_f(x)


def decoder_for(model):
    """A slot-cache decoder for this model, or None when its architecture is not covered."""
    cfg = model.config
    if cfg.model_type == "llama" and hasattr(model, "model") and not getattr(cfg, "sliding_window", None):
        attn = model.model.layers[0].self_attn
        if not hasattr(attn, "q_norm"):  # plain Llama attention only
            return LlamaDecoder(model)
    if cfg.model_type == "gpt2" and not cfg.reorder_and_upcast_attn and not cfg.add_cross_attention:
        return GPT2Decoder(model)
    return None
