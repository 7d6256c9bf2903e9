"""GPT-2's forward pass over its own modules, with slot-cache attention."""

from __future__ import annotations

import torch

from server.engine.models.slot_attention import SlotAttention


class GPT2SlotModel:
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
