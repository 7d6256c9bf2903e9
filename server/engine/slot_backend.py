"""The slot-KV backend: Llama-style and GPT-2 models run by our own forwards
(server/engine/models/) over a preallocated slot KV cache.

Row i of the batch lives in slot i of the cache. A request may join between
any two decode steps: it starts from a copy of its task's prefix (computed once
per task version) and prefills only the rest of its tokens. A row that leaves
frees its slot at once: the last row moves into it, so the running rows stay
in slots 0..n-1 and a decode step reads the cache as a plain view.
"""

from __future__ import annotations

import torch

from ptcore.inputs import embed, on_device, pack_from, prompt_table
from ptcore.model import LoadedModel
from server.engine.decode_step import DecodeStep
from server.engine.kv_cache import SlotKVCache
from server.engine.models.slot_attention import SlotAttention
from server.engine.prefix_cache import PrefixCache
from server.engine.request import Request


class SlotBackend:
    def __init__(self, loaded: LoadedModel, model, max_running: int, max_len: int, max_tokens: int,
                 prefix_cache_size: int, reuse_prefixes: bool = True, cuda_graphs: bool = True,
                 compile: bool = False, pad_steps: bool | None = None):  # fmt: skip
        """model: a slot forward of server/engine/models for loaded.model.
        max_tokens bounds the sum of (input + max_new_tokens) over running rows.
        cuda_graphs, compile, pad_steps: how the decode step runs (server/engine/decode_step.py)."""
        self.loaded = loaded
        self.model = model
        self.lm_head = loaded.model.get_output_embeddings()
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
        """Prefill `requests` as one batch in the next free slots; -> their last
        positions' logits [n, V]. They become rows rows..rows+n-1.

        Prefixes not cached yet are prefilled first, one row per distinct task
        version, into the slot of its first newcomer; then every newcomer starts
        from its task's prefix and prefills only the rest. A request no longer
        than the prefix prefills everything (its last token's logits are needed)."""
        slots = list(range(self.rows, self.rows + len(requests)))
        keys = [r.prompt.key for r in requests]
        usable = [self.reuse_prefixes and 0 < r.prompt.prefix_len < len(r.input_ids) for r in requests]
        prefix_kv = {key: self.prefixes.get(key) for key in dict.fromkeys(k for k, use in zip(keys, usable) if use)}
        missing: dict = {}  # task version -> index of the newcomer that computes its prefix
        for i, (key, use) in enumerate(zip(keys, usable)):
            if use and prefix_kv[key] is None and key not in missing:
                missing[key] = i
        if missing:
            owners = list(missing.values())
            self._forward([slots[i] for i in owners], [0] * len(owners),
                          [requests[i].input_ids[: requests[i].prompt.prefix_len] for i in owners],
                          [requests[i] for i in owners])  # fmt: skip
            for key, i in missing.items():
                prefix_kv[key] = self.cache.export(slots[i], requests[i].prompt.prefix_len)
                self.prefixes.put(key, prefix_kv[key])

        starts, seqs, loads = [], [], []
        for i, (r, key, use) in enumerate(zip(requests, keys, usable)):
            start = r.prompt.prefix_len if use else 0
            if use and missing.get(key) != i:  # the owner's slot already holds it
                loads.append(i)
            starts.append(start)
            seqs.append(r.input_ids[start:])
        if loads:
            self.cache.load([slots[i] for i in loads], [prefix_kv[keys[i]] for i in loads])
        hidden = self._forward(slots, starts, seqs, requests)  # [n, T, H]
        dev = self.loaded.device
        last = on_device([len(seq) - 1 for seq in seqs], dev)
        logits = self.lm_head(hidden[torch.arange(len(requests), device=dev), last])  # [n, V]
        self.lengths.extend(len(r.input_ids) for r in requests)
        self.needs.extend(r.need for r in requests)
        return logits

    def _forward(self, slots: list[int], starts: list[int], seqs: list[list[int]], requests: list[Request]):
        """Run token lists `seqs` (row b starting at position starts[b] of slot
        slots[b]) as one right-padded batch; -> hidden states [B, T, H]."""
        dev, V = self.loaded.device, self.loaded.vocab_size
        table, offsets = prompt_table([r.prompt.rows for r in requests])
        ids, positions = pack_from(seqs, offsets, starts, V, dev, self.max_len - 1)
        length = min(max(starts) + ids.shape[1], self.max_len)
        attention = SlotAttention(self.cache, on_device(slots, dev), positions, length)
        return self.model.hidden(embed(self.embed_tokens, ids, table, V), attention)

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed tokens[i] to row i at its next position; -> logits [rows, V]."""
        logits = self.decode_step(tokens, self.lengths)
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def keep(self, order: list[int]) -> None:
        """Rows left: order[j] is the old row that becomes row j. A survivor
        below len(order) keeps its place; others move into freed slots."""
        for new, old in enumerate(order):
            if old != new:
                assert old >= len(order), "a moved row must come from beyond the survivors"
                self.cache.move(old, new, self.lengths[old])
        self.lengths = [self.lengths[i] for i in order]
        self.needs = [self.needs[i] for i in order]
