"""The Hugging Face backend: any causal LM through its own forward and a
`DynamicCache`, for architectures the slot backend does not cover and for
models spread over devices by `device_map`.

Sequences are left-padded and position ids count real tokens only, so
absolute-position and rotary models see what they would see alone. The cache
has one clock for all rows, so requests join only an empty batch; a row that
finishes is dropped from the cache at once.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from ptcore.inputs import embed, on_device, pack, prompt_table
from ptcore.model import LoadedModel
from server.engine.request import Request


class HFBackend:
    admits_while_running = False

    def __init__(self, loaded: LoadedModel, max_running: int):
        self.loaded = loaded
        self.model = loaded.model
        self.embed_tokens = loaded.model.get_input_embeddings()
        self.max_running = max_running
        self.max_len = loaded.max_positions  # None: the model sets no bound
        # transformers renamed forward(past_key_values=) to forward(cache=) during 5.x
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.rows = 0
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, T]: 0 where a row is padded
        self._positions: torch.Tensor | None = None  # [rows, 1]: each row's last position

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
        self.rows = len(requests)
        return out.logits[:, -1]

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed tokens[i] to row i; -> logits [rows, V]."""
        step = on_device(tokens, self.loaded.device).unsqueeze(1)  # [rows, 1]
        self._mask = torch.cat([self._mask, self._mask.new_ones(self.rows, 1)], dim=1)
        self._positions = self._positions + 1
        out = self.model(inputs_embeds=self.embed_tokens(step), attention_mask=self._mask,
                         position_ids=self._positions, use_cache=True, **{self._cache_kw: self._cache})  # fmt: skip
        return out.logits[:, -1]

    def keep(self, order: list[int]) -> None:
        """Rows left: order[j] is the old row that becomes row j."""
        if not order:
            self._cache = self._mask = self._positions = None
        elif order != list(range(self.rows)):
            index = torch.tensor(order, device=self._mask.device)
            self._cache.batch_select_indices(index)
            self._mask, self._positions = self._mask[index], self._positions[index]
        self.rows = len(order)
