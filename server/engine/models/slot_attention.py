"""Attention against the slot KV cache (server/engine/kv_cache.py): each row
reads and writes its own slot at its own positions, so rows of different
lengths run together without padding to a shared clock. The model forwards
in this package call it in place of their own attention."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from server.engine.kv_cache import SlotKVCache

MASK_ALIGN = 16


class SlotAttention:
    """Where one forward pass's tokens live in the cache, shared by all its layers.

    Row b of the pass is slot first + b (the decode step: first = 0; a prefill:
    the newcomers' slots, which follow the running rows), so every layer reads
    the cache as a view. positions: [B, T]. length: each row reads positions
    0..length-1, which must cover the position of every real token (a padding
    token past that reads those keys only; what it computes is never used)."""

    def __init__(self, cache: SlotKVCache, first: int, positions: torch.Tensor, length: int):
        B = positions.shape[0]
        self.cache = cache
        self.first = first
        self.slot_ids = torch.arange(first, first + B, device=positions.device)
        self.positions = positions
        self.length = length
        self._bias: torch.Tensor | None = None  # built by the first layer, used by all

    def __call__(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        """q: [B, heads, T, hd]; k, v: [B, kv_heads, T, hd] -> [B, T, heads * hd]."""
        self.cache.write(layer, self.slot_ids, self.positions, k, v)
        B, H, T, D = q.shape
        keys, values = self.cache.read(layer, self.first, B, self.length)  # [B, kv_heads, length, hd]
        group = H // keys.shape[1]
        # grouped-query attention without copying keys: the `group` query heads
        # that share a key head become extra query rows of that head
        q = q.reshape(B, H // group, group * T, D)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=self._mask(group, q.dtype), scale=scale)
        return out.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)

    def _mask(self, group: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, group * T, length]: 0 where a query may see a key (its own row's
        keys at positions <= its own), -inf elsewhere. What SDPA would make of a
        boolean mask, made once per pass instead of once per layer.

        Its rows are laid out MASK_ALIGN elements apart: CUDA's memory-efficient
        kernel copies a mask whose strides are not multiples of 8 into one that
        is, in every call (every layer), unless it already is."""
        if self._bias is None:
            B, T = self.positions.shape
            # always wider than length (a whole block more when length is a multiple):
            # the slice below then never covers the whole row, which torch.compile
            # would otherwise take as a special case and compile again for
            width = (self.length // MASK_ALIGN + 1) * MASK_ALIGN
            visible = torch.arange(width, device=self.positions.device) <= self.positions[:, :, None]
            visible = visible[:, None].expand(B, group, T, width).reshape(B, 1, group * T, width)
            bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))
            self._bias = bias[..., : self.length]
        return self._bias
