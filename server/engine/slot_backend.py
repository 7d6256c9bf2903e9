"""The slot-KV backend: Llama-style and GPT-2 models run by our own forwards
(server/engine/models/) over a preallocated slot KV cache.

Row i of the batch lives in slot i of the cache. A request may join between
any two decode steps: it starts from a copy of its task's prefix (computed once
per task version, by the first request that needs it) and prefills only the
rest of its tokens. A row that leaves
frees its slot at once: the last row moves into it, so the running rows stay
in slots 0..n-1 and a decode step reads the cache as a plain view.
"""

from __future__ import annotations

import torch

from ptcore.inputs import embed, on_device, pack_from, prompt_table
from ptcore.model import LoadedModel
from server.engine.decode_step import DecodeStep
from server.engine.kv_cache import SlotKVCache
from server.engine.models.cpu_linear import Linear
from server.engine.models.slot_attention import SlotAttention
from server.engine.prefix_cache import PrefixCache
from server.engine.request import Request


class SlotBackend:
    def __init__(self, loaded: LoadedModel, model, max_running: int, max_len: int, max_tokens: int,
                 prefix_cache_size: int, reuse_prefixes: bool = True, cuda_graphs: bool = True,
                 compile: bool = False, pad_steps: bool | None = None, packed: bool = True):  # fmt: skip
        """model: a slot forward of server/engine/models for loaded.model.
        max_tokens bounds the sum of (input + max_new_tokens) over running rows.
        cuda_graphs, compile, pad_steps: how the decode step runs (server/engine/decode_step.py).
        packed: the LM head reads packed copies of its weight on the CPU (server/engine/models/cpu_linear.py)."""
        self.loaded = loaded
        self.model = model
        head = loaded.model.get_output_embeddings()
        self.lm_head = Linear(head.weight, head.bias, packed, dnn=True, max_rows=max_running)
        self.embed_tokens = loaded.model.get_input_embeddings()
        self.logits_device = loaded.model.get_output_embeddings().weight.device
        self.max_running = max_running
        self.max_len = max_len
        self.max_tokens = max_tokens
        self.reuse_prefixes = reuse_prefixes
        self.cache = SlotKVCache(model.num_layers, max_running, model.kv_heads, max_len, model.head_dim,
                                 loaded.dtype, loaded.device)  # fmt: skip
        self.prefixes = PrefixCache(prefix_cache_size)
        self.lengths: list[int] = []  # row i: positions 0..lengths[i]-1 of slot i hold keys and values
        self.needs: list[int] = []  # row i: the positions its request may fill
        self.decode_step = DecodeStep(model, self.embed_tokens, self.lm_head, self.cache, loaded.device,
                                      graphs=cuda_graphs, compile=compile, pad=pad_steps)  # fmt: skip

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def fits(self, request: Request, admitted: list[Request]) -> bool:
        """Would `request` fit beside the running rows and those already admitted this step?
        A request alone always fits (the server refuses longer ones before they queue)."""
        if self.rows + len(admitted) >= self.max_running:
            return False
        used = sum(self.needs) + sum(r.need for r in admitted)
        return used + request.need <= self.max_tokens or not (self.rows or admitted)

    def prefill(self, requests: list[Request]) -> torch.Tensor:
        """Prefill `requests` as one batch in the next free slots, in one forward
        pass; -> their last positions' logits [n, V]. They become rows
        rows..rows+n-1.

        A newcomer whose task's prefix is cached starts from a copy of it and
        prefills only the rest. One whose prefix is not cached prefills all its
        tokens; the first of each task version then exports its prefix for
        the next. (Computing missing prefixes in a pass of their own, then
        loading them, costs a second pass: a layer's worth of kernel launches
        more, to save a few rows of prefix tokens.) A request no longer than
        its prefix prefills everything (its last token's logits are needed)."""
        first = self.rows
        keys = [r.prompt.key for r in requests]
        reuse = self.reuse_prefixes and self.prefixes.capacity > 0
        usable = [reuse and 0 < r.prompt.prefix_len < len(r.input_ids) for r in requests]
        cached = {key: self.prefixes.get(key) for key in dict.fromkeys(k for k, use in zip(keys, usable) if use)}
        exporters: dict = {}  # task version -> the newcomer whose slot will hold its prefix
        starts, loads = [], []
        for i, (r, key, use) in enumerate(zip(requests, keys, usable)):
            if use and cached[key] is not None:
                loads.append(i)
                starts.append(r.prompt.prefix_len)
            else:
                if use:
                    exporters.setdefault(key, i)
                starts.append(0)
        seqs = [r.input_ids[start:] for r, start in zip(requests, starts)]
        try:
            if loads:
                self.cache.load([first + i for i in loads], [cached[keys[i]] for i in loads])
            hidden = self._forward(first, starts, seqs, requests)  # [n, T, H]
            for key, i in exporters.items():
                self.prefixes.put(key, self.cache.export(first + i, requests[i].prompt.prefix_len))
            dev = self.loaded.device
            last = on_device([len(seq) - 1 for seq in seqs], dev)
            logits = self.lm_head(hidden[torch.arange(len(requests), device=dev), last])  # [n, V]
        except Exception:  # the slots stay free, and may hold part of a pass that overflowed: zero them
            self.scrub(list(range(first, first + len(requests))))
            raise
        self.lengths.extend(len(r.input_ids) for r in requests)
        self.needs.extend(r.need for r in requests)
        return logits

    def _forward(self, first: int, starts: list[int], seqs: list[list[int]], requests: list[Request]):
        """Run token lists `seqs` (row b starting at position starts[b] of slot
        first + b) as one right-padded batch; -> hidden states [B, T, H]."""
        dev, V = self.loaded.device, self.loaded.vocab_size
        table, offsets = prompt_table([r.prompt.rows for r in requests])
        ids, positions = pack_from(seqs, offsets, starts, V, dev, self.max_len - 1)
        length = min(max(start + len(seq) for start, seq in zip(starts, seqs)), self.max_len)  # the furthest row's end
        attention = SlotAttention(self.cache, first, positions, length)
        return self.model.hidden(embed(self.embed_tokens, ids, table, V), attention)

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed tokens[i] to row i at its next position; -> logits [rows, V]."""
        logits = self.decode_step(tokens, self.lengths)
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def scrub(self, rows: list[int]) -> None:
        """Zero the slots of rows that failed (slot i is row i). Their keys and
        values may be NaN or Inf, and later rows in these slots read past their own
        end (masked, but NaN survives a mask): a bad request must not fail the next one."""
        for row in rows:
            self.cache.clear(row)

    def keep(self, order: list[int]) -> None:
        """Rows left: order[j] is the old row that becomes row j. A survivor
        below len(order) keeps its place; others move into freed slots."""
        for new, old in enumerate(order):
            if old != new:
                assert old >= len(order), "a moved row must come from beyond the survivors"
                self.cache.move(old, new, self.lengths[old])
        self.lengths = [self.lengths[i] for i in order]
        self.needs = [self.needs[i] for i in order]
