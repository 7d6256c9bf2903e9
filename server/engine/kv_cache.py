"""A preallocated KV cache of fixed slots, one running sequence per slot.

A token's keys and values are stored at index = its position in its own
sequence, so rows of different lengths never need padding or a shared clock,
and a row can join or leave between any two decode steps. Running rows are
kept in slots 0..n-1 (`move` fills a freed slot with the last row), so a
decode step reads the cache as a plain view, with no gather.
"""

from __future__ import annotations

import torch

from ptcore.inputs import on_device


class SlotKVCache:
    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots = slots
        self.max_len = max_len

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v: [B, kv_heads, T, head_dim] at positions [B, T] of slots [B]."""
        b = slots[:, None].expand_as(positions)  # [B, T]
        # advanced indexing on dims 0 and 2 puts (B, T) first: [B, T, kv_heads, head_dim]
        self.keys[layer][b, :, positions] = k.transpose(1, 2)
        self.values[layer][b, :, positions] = v.transpose(1, 2)

    def read(self, layer: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [rows, kv_heads, length, head_dim] of slots 0..rows-1,
        as views (the decode step)."""
        return self.keys[layer][:rows, :, :length], self.values[layer][:rows, :, :length]

    def gather(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv_heads, length, head_dim] of the [B] `slots` (prefill)."""
        return self.keys[layer][slots, :, :length], self.values[layer][slots, :, :length]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst."""
        for kv in (*self.keys, *self.values):
            kv[dst, :, :length] = kv[src, :, :length]

    def export(self, slot: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of one slot's first `length` positions, per layer (for the prefix cache)."""
        return [(k[slot, :, :length].clone(), v[slot, :, :length].clone()) for k, v in zip(self.keys, self.values)]

    def load(self, slots: list[int], kvs: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Place exported prefixes at positions 0.. of their slots (kvs[i] into
        slots[i]). Prefixes of one length go in together: two copies per layer
        for the whole group, not per slot (a batch of 64 newcomers would
        otherwise launch 64 x layers x 2 small copies)."""
        by_length: dict[int, list[int]] = {}
        for i, kv in enumerate(kvs):
            by_length.setdefault(kv[0][0].shape[1], []).append(i)
        for n, group in by_length.items():
            index = on_device([slots[i] for i in group], self.keys[0].device)
            for layer in range(len(self.keys)):
                self.keys[layer][index, :, :n] = torch.stack([kvs[i][layer][0] for i in group])
                self.values[layer][index, :, :n] = torch.stack([kvs[i][layer][1] for i in group])
