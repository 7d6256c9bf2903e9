"""Attention against the slot KV cache (server/engine/kv_cache.py): each row
reads and writes its own slot at its own positions, so rows of different
lengths run together without padding to a shared clock. The model forwards
in this package call it in place of their own attention."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from server.engine.kv_cache import SlotKVCache


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
