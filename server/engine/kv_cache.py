"""A preallocated KV cache of fixed slots, one running sequence per slot.

A token's keys and values are stored at index = its position in its own
sequence, so rows of different lengths never need padding or a shared clock,
and a row can join or leave between any two decode steps. Running rows are
kept in slots 0..n-1 (`move` fills a freed slot with the last row), so a
decode step reads the cache as a plain view, with no gather.

All layers' keys live in one tensor [layers, slots, kv_heads, max_len,
head_dim] (values in another): a layer reads and writes its own view, and the
operations on whole slots (move, export, load) are one copy for all layers, not
one per layer. Outside CUDA graphs each of those copies is a kernel launch, and
they run between decode steps.
"""

from __future__ import annotations

import torch

from ptcore.inputs import on_device

# a cached prefix (server/engine/prefix_cache.py): keys, values [layers, kv_heads, length, head_dim]
SlotKV = tuple[torch.Tensor, torch.Tensor]


class SlotKVCache:
    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (num_layers, slots, kv_heads, max_len, head_dim)
        self.all_keys = torch.zeros(shape, dtype=dtype, device=device)
        self.all_values = torch.zeros(shape, dtype=dtype, device=device)
        self.keys = list(self.all_keys.unbind(0))  # per layer: views [slots, kv_heads, max_len, head_dim]
        self.values = list(self.all_values.unbind(0))
        self.slots = slots
        self.max_len = max_len

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v: [B, kv_heads, T, head_dim] at positions [B, T] of slots [B]."""
        b = slots[:, None].expand_as(positions)  # [B, T]
        # advanced indexing on dims 0 and 2 puts (B, T) first: [B, T, kv_heads, head_dim]
        self.keys[layer][b, :, positions] = k.transpose(1, 2)
        self.values[layer][b, :, positions] = v.transpose(1, 2)

    def read(self, layer: int, first: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [rows, kv_heads, length, head_dim] of slots first..first+rows-1, as views."""
        end = first + rows
        return self.keys[layer][first:end, :, :length], self.values[layer][first:end, :, :length]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst, in every layer."""
        for kv in (self.all_keys, self.all_values):
            kv[:, dst, :, :length] = kv[:, src, :, :length]

    def clear(self, slot: int) -> None:
        """Zeros in every position of one slot, in every layer."""
        self.all_keys[:, slot].zero_()
        self.all_values[:, slot].zero_()

    def export(self, slot: int, length: int) -> SlotKV:
        """A copy of one slot's first `length` positions in every layer (for the prefix cache)."""
        return self.all_keys[:, slot, :, :length].clone(), self.all_values[:, slot, :, :length].clone()

    def load(self, slots: list[int], kvs: list[SlotKV]) -> None:
        """Place exported prefixes at positions 0.. of their slots (kvs[i] into
        slots[i]). The slots that take one prefix (newcomers of one task) get it
        together: one copy for its keys and one for its values, into all those
        slots and every layer, with no stacked temporary."""
        by_prefix: dict[int, list[int]] = {}
        for i, kv in enumerate(kvs):
            by_prefix.setdefault(id(kv), []).append(i)
        for group in by_prefix.values():
            keys, values = kvs[group[0]]
            n = keys.shape[2]
            index = on_device([slots[i] for i in group], self.all_keys.device)
            self.all_keys[:, index, :, :n] = keys.unsqueeze(1)  # [layers, 1, kv, n, hd], broadcast over the slots
            self.all_values[:, index, :, :n] = values.unsqueeze(1)
