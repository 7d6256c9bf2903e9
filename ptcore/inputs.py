"""The join: rendered token ids with virtual ids -> model inputs.

A rendered sequence writes pseudo token i of its task as `V + i` (V = rows of
the input embedding matrix). For a batch, the distinct prompts' rows are
stacked into one table and each sequence's virtual ids are shifted by its
task's offset in that table; `embed` looks real ids up in the embedding
matrix and virtual ids in the table. Serving (both backends) and training
build their inputs here, so a trained prompt is run exactly as it is served.
"""

from __future__ import annotations

import torch


def prompt_table(rows: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Stack the distinct tensors of `rows` (by identity): table [R, H], and the
    first row of each entry of `rows` in it."""
    first_row: dict[int, int] = {}
    blocks, offsets, total = [], [], 0
    for r in rows:
        if id(r) not in first_row:
            first_row[id(r)] = total
            blocks.append(r)
            total += r.shape[0]
        offsets.append(first_row[id(r)])
    return torch.cat(blocks), offsets


def on_device(values: list, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """A list of ids, positions, row indices (or per-row parameters, with a float
    dtype) as one tensor on `device`: one host-to-device copy."""
    return torch.tensor(values, dtype=dtype, device=device)


def shift_virtual_ids(seq: list[int], offset: int, vocab_size: int) -> torch.Tensor:
    """One rendered sequence as a host tensor, its virtual ids moved to its task's rows of the table."""
    row = torch.tensor(seq, dtype=torch.long)
    return torch.where(row >= vocab_size, row + offset, row)


def pack(seqs: list[list[int]], offsets: list[int], vocab_size: int, device: torch.device, left: bool = True):
    """Pad into ids [B, T], attention_mask [B, T] and position_ids [B, T] on
    `device` (positions count real tokens only); virtual ids of row b shift by
    offsets[b]. Left padding (causal LMs: every row ends at T-1) or right padding
    (masked LMs and encoders, which then number positions themselves)."""
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, (seq, offset) in enumerate(zip(seqs, offsets)):
        span = slice(T - len(seq), T) if left else slice(0, len(seq))
        ids[b, span] = shift_virtual_ids(seq, offset, vocab_size)
        mask[b, span] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def pack_from(seqs: list[list[int]], offsets: list[int], starts: list[int], vocab_size: int, device: torch.device,
              max_position: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Right-padded ids [B, T] and positions [B, T] on `device` for sequences that
    continue a cached prefix: row b's first token sits at position starts[b].
    Padding positions continue past each row's end (capped at max_position);
    whatever they compute lands where the row writes again before reading it."""
    T = max(len(seq) for seq in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, (seq, offset) in enumerate(zip(seqs, offsets)):
        ids[b, : len(seq)] = shift_virtual_ids(seq, offset, vocab_size)
    positions = (torch.tensor(starts)[:, None] + torch.arange(T)[None, :]).clamp(max=max_position)
    return ids.to(device), positions.to(device)


def embed(embed_tokens: torch.nn.Module, ids: torch.Tensor, table: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """ids [B, T] -> [B, T, H]; ids >= vocab_size read rows of `table` [R, H]."""
    virtual = ids >= vocab_size
    real = embed_tokens(ids.masked_fill(virtual, 0))
    if not virtual.any():
        return real
    soft = table[(ids - vocab_size).clamp(min=0, max=table.shape[0] - 1)]
    return torch.where(virtual.unsqueeze(-1), soft.to(real.dtype), real)
