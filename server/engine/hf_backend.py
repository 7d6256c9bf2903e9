"""The Hugging Face backend: any causal LM through its own forward and a
`DynamicCache`, for architectures the slot backend does not cover and for
models spread over devices by `device_map`.

Sequences are left-padded and position ids count real tokens only, so
absolute-position and rotary models see what they would see alone. The cache
has one clock for all rows, so requests join only an empty batch. A row that
finishes is dropped from the cache at once where every cache layer can select
rows (attention layers); a cache with other layers (convolution or linear
attention state) keeps its finished rows riding along, unread, until the batch
ends.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from ptcore.inputs import embed, on_device, pack, prompt_table
from ptcore.model import LoadedModel
from server.engine.request import Request


class HFBackend:
    def __init__(self, loaded: LoadedModel, max_running: int):
        self.loaded = loaded
        self.model = loaded.model
        self.embed_tokens = loaded.model.get_input_embeddings()
        self.logits_device = loaded.model.get_output_embeddings().weight.device
        self.max_running = max_running
        self.max_len = loaded.max_positions  # None: the model sets no bound
        # transformers renamed forward(past_key_values=) to forward(cache=) during 5.x
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._live: list[int] = []  # batch row j is row _live[j] of the model state
        self._selectable = True  # every cache layer can drop rows (set per batch at prefill)
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, T]: 0 where a row is padded
        self._positions: torch.Tensor | None = None  # [rows, 1]: each row's last position

    @property
    def rows(self) -> int:
        return len(self._live)

    def fits(self, request: Request, admitted: list[Request]) -> bool:
        return self.rows == 0 and len(admitted) < self.max_running

    def prefill(self, requests: list[Request]) -> torch.Tensor:
        """Start a batch of `requests` (none may be running); -> last-position logits [n, V]."""
        assert self.rows == 0, "the Hugging Face backend admits only into an empty batch"
        V = self.loaded.vocab_size
        table, offsets = prompt_table([r.prompt.rows for r in requests])
        ids, mask, positions = pack([r.input_ids for r in requests], offsets, V, self.loaded.device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(inputs_embeds=embed(self.embed_tokens, ids, table, V), attention_mask=mask,
                         position_ids=positions, use_cache=True, logits_to_keep=1,
                         **{self._cache_kw: cache})  # fmt: skip
        self._cache, self._mask, self._positions = cache, mask, positions[:, -1:]
        self._live = list(range(len(requests)))
        self._selectable = all(hasattr(layer, "batch_select_indices") for layer in cache.layers)
        return out.logits[:, -1]

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed tokens[i] to row i; -> logits [rows, V]."""
        state_rows = self._mask.shape[0]
        fed = [0] * state_rows  # rows riding along after their request finished are fed anything
        for j, row in enumerate(self._live):
            fed[row] = tokens[j]
        step = on_device(fed, self.loaded.device).unsqueeze(1)  # [state rows, 1]
        self._mask = torch.cat([self._mask, self._mask.new_ones(state_rows, 1)], dim=1)
        self._positions = self._positions + 1
        out = self.model(inputs_embeds=self.embed_tokens(step), attention_mask=self._mask,
                         position_ids=self._positions, use_cache=True, **{self._cache_kw: self._cache})  # fmt: skip
        logits = out.logits[:, -1]
        return logits if len(self._live) == state_rows else logits[on_device(self._live, logits.device)]

    def scrub(self, rows: list[int]) -> None:
        """Nothing to do: each row attends only to its own row of the cache, which leaves with it."""

    def keep(self, order: list[int]) -> None:
        """Rows left: order[j] is the old row that becomes row j."""
        live = [self._live[i] for i in order]
        if not live:
            self._cache = self._mask = self._positions = None
        elif self._selectable and live != list(range(self._mask.shape[0])):
            # a CPU index: with device_map the cache's layers sit on several devices
            self._cache.batch_select_indices(torch.tensor(live))
            index = on_device(live, self._mask.device)
            self._mask, self._positions = self._mask[index], self._positions[index]
            live = list(range(len(live)))
        self._live = live
