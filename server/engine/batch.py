"""Iteration-level (continuous) batching of generate work over a slot KV cache.

Between two decode steps, newcomers are admitted (their prefill runs as one
batch) and finished rows leave at once, so no request waits for the longest
one in its batch. Row i of the running batch lives in slot i of the cache.
Each newcomer starts from a copy of its task's prefix (computed once per task
version, see `admit`) and prefills only the rest of its tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prompt_store.errors import Abandoned
from ptcore.inputs import embed, prompt_table
from ptcore.model import LoadedModel
from server.engine.decode_step import DecodeStep
from server.engine.kv_cache import SlotKVCache
from server.engine.models.slot_attention import SlotAttention
from server.engine.prefix_cache import PrefixCache
from server.engine.request import GenerateResult, GenerateWork
from server.engine.sampling import RowDecoder, step_rows

log = logging.getLogger(__name__)

OnFinish = Callable[[GenerateWork, "GenerateResult | Exception"], None]


@dataclass(eq=False)
class Row:
    work: GenerateWork
    decoder: RowDecoder
    length: int = 0  # positions 0..length-1 of its slot hold keys and values
    next_token: int = 0  # the last token chosen: fed at position `length` by the next step


class ContinuousBatcher:
    def __init__(self, loaded: LoadedModel, decoder, max_running: int, max_len: int, max_tokens: int,
                 prefix_cache_size: int, reuse_prefixes: bool = True, cuda_graphs: bool = True,
                 compile: bool = False, pad_steps: bool | None = None):  # fmt: skip
        """cuda_graphs, compile, pad_steps: how the decode step runs (server/engine/decode_step.py)."""
        self.loaded = loaded
        self.decoder = decoder
        self.lm_head = loaded.model.get_output_embeddings()
        self.embed_tokens = loaded.model.get_input_embeddings()
        self.eos_ids = loaded.eos_token_ids
        self.max_running = max_running
        self.max_len = max_len
        self.max_tokens = max_tokens  # bound on the sum of (input + max_new_tokens) over running rows
        self.reuse_prefixes = reuse_prefixes
        self.cache = SlotKVCache(decoder.num_layers, max_running, decoder.kv_heads, max_len, decoder.head_dim,
                                 loaded.dtype, loaded.device)  # fmt: skip
        self.prefixes = PrefixCache(prefix_cache_size)
        self.rows: list[Row] = []
        self.decode = DecodeStep(decoder, self.embed_tokens, self.lm_head, self.cache, loaded.device,
                                 graphs=cuda_graphs, compile=compile, pad=pad_steps)  # fmt: skip

    # -- admission -----------------------------------------------------------

    @staticmethod
    def need(work: GenerateWork) -> int:
        return len(work.input_ids) + work.params.max_new_tokens

    def tokens_in_flight(self) -> int:
        return sum(self.need(r.work) for r in self.rows)

    def fits(self, work: GenerateWork, admitted: list[GenerateWork]) -> bool:
        """Would `work` fit beside the running rows and those already admitted this step?"""
        if len(self.rows) + len(admitted) >= self.max_running:
            return False
        used = self.tokens_in_flight() + sum(self.need(w) for w in admitted)
        return used + self.need(work) <= self.max_tokens or not (self.rows or admitted)

    # -- prefill of newcomers --------------------------------------------------

    @torch.inference_mode()
    def admit(self, works: list[GenerateWork], on_finish: OnFinish) -> None:
        """Prefill `works` as one batch in free slots; choose their first tokens.

        A task's prefix is computed once: prefixes that are not cached yet are
        prefilled first, one row per distinct task version, into the slot of its
        first newcomer; then every newcomer starts from its task's prefix and
        prefills only the rest. A request no longer than the prefix itself
        prefills everything (its last token's logits are needed)."""
        first_slot = len(self.rows)
        slots = list(range(first_slot, first_slot + len(works)))
        keys = [w.prompt.key for w in works]
        usable = [self.reuse_prefixes and 0 < w.prompt.prefix_len < len(w.input_ids) for w in works]
        prefix_kv = {}
        for key, use in zip(keys, usable):
            if use and key not in prefix_kv:
                prefix_kv[key] = self.prefixes.get(key)
        missing = {}  # task version -> index of the newcomer that computes its prefix
        for i, (key, use) in enumerate(zip(keys, usable)):
            if use and prefix_kv[key] is None and key not in missing:
                missing[key] = i
        if missing:
            owners = list(missing.values())
            self._forward([slots[i] for i in owners], [0] * len(owners),
                          [works[i].input_ids[: works[i].prompt.prefix_len] for i in owners],
                          [works[i] for i in owners])  # fmt: skip
            for key, i in missing.items():
                prefix_kv[key] = self.cache.export(slots[i], works[i].prompt.prefix_len)
                self.prefixes.put(key, prefix_kv[key])

        starts, seqs, loads = [], [], []
        for i, (w, key, use) in enumerate(zip(works, keys, usable)):
            if use:
                if missing.get(key) != i:  # the owner's slot already holds it
                    loads.append(i)
                starts.append(w.prompt.prefix_len)
                seqs.append(w.input_ids[w.prompt.prefix_len :])
            else:
                starts.append(0)
                seqs.append(w.input_ids)
        if loads:
            self.cache.load([slots[i] for i in loads], [prefix_kv[keys[i]] for i in loads])
        hidden = self._forward(slots, starts, seqs, works)  # [B, T, H]
        dev = self.loaded.device
        last = torch.tensor([len(seq) - 1 for seq in seqs], device=dev)
        logits = self.lm_head(hidden[torch.arange(len(works), device=dev), last])  # [B, V]
        new_rows = [
            Row(w, RowDecoder(w.params, self.eos_ids, self.loaded.tokenizer, dev, w.on_token), len(w.input_ids))
            for w in works
        ]
        self.rows.extend(new_rows)
        self._advance(logits, first_slot, on_finish)

    def _forward(self, slots: list[int], starts: list[int], seqs: list[list[int]], works: list[GenerateWork]):
        """Run token lists `seqs` (row b starting at position starts[b] of slot
        slots[b]) as one right-padded batch; -> hidden states [B, T, H]."""
        B, T = len(seqs), max(len(seq) for seq in seqs)
        dev = self.loaded.device
        table, offsets = prompt_table([w.prompt.rows for w in works])
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, (seq, off) in enumerate(zip(seqs, offsets)):  # virtual ids shifted to their task's rows
            row = torch.tensor(seq, dtype=torch.long)
            ids[b, : len(seq)] = torch.where(row >= self.loaded.vocab_size, row + off, row)
        # positions continue past each row's end for its padding; those writes land
        # at positions the row will overwrite before it ever reads them
        positions = (torch.tensor(starts)[:, None] + torch.arange(T)[None, :]).clamp(max=self.max_len - 1)
        x = embed(self.embed_tokens, ids.to(dev), table, self.loaded.vocab_size)
        length = min(max(starts) + T, self.max_len)
        attention = SlotAttention(self.cache, torch.tensor(slots, device=dev), positions.to(dev), length)
        return self.decoder.hidden(x, attention)

    # -- one decode step for every running row --------------------------------

    def drop_abandoned(self, on_finish: OnFinish) -> None:
        """Free the slots of rows whose client left or whose deadline passed."""
        for i in reversed(range(len(self.rows))):
            if self.rows[i].work.abandoned:
                self._retire(i, on_finish, Abandoned("the request was abandoned"))

    @torch.inference_mode()
    def step(self, on_finish: OnFinish) -> None:
        logits = self.decode([r.next_token for r in self.rows], [r.length for r in self.rows])
        for r in self.rows:
            r.length += 1
        self._advance(logits, 0, on_finish)

    def _advance(self, logits: torch.Tensor, first: int, on_finish: OnFinish) -> None:
        """Sample for rows first.. (logits [B, V] in that order); retire finished rows."""
        rows = self.rows[first:]
        chosen, finished = step_rows(logits, [r.decoder for r in rows])
        now = time.monotonic()
        for r, token in zip(rows, chosen):
            r.next_token = token
            if r.work.first_token_at is None:
                r.work.first_token_at = now
        for i in sorted((first + j for j in finished), reverse=True):
            self._retire(i, on_finish, self.rows[i].decoder.result())

    def _retire(self, i: int, on_finish: OnFinish, result) -> None:
        """Answer row i and free its slot, keeping running rows in slots 0..n-1."""
        on_finish(self.rows[i].work, result)
        last = len(self.rows) - 1
        if i != last:
            self.cache.move(last, i, self.rows[last].length)
            self.rows[i] = self.rows[last]
        self.rows.pop()

    @property
    def running(self) -> int:
        return len(self.rows)
