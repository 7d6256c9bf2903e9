"""The running generate requests, over a backend that holds their model state.

The batch owns its rows: row i is `requests[i]` here and row i of the backend.
Its operations (prefill newcomers, one decode step, remove rows) return the
requests that finished; answering them is the scheduler's job.

A backend (server/engine/slot_backend.py, server/engine/hf_backend.py) offers:
  rows, max_len, logits_device
  fits(request, admitted) -> bool
  prefill(requests) -> logits [n, V]    the newcomers become the last n rows
  decode(tokens) -> logits [rows, V]    one token per row
  keep(order)                           order[j]: the old row that becomes row j
  scrub(rows)                           these rows computed NaN/Inf: no later row may read their state
"""

from __future__ import annotations

import torch

from ptcore.model import LoadedModel
from server.engine.request import Request
from server.engine.sampling import make_generator, non_finite_output, sample
from server.engine.text import TextStream


def order_after_removing(rows: int, gone: list[int]) -> list[int]:
    """The rows left after removing the indices `gone`, each freed place taken
    by the last row (so at most one row moves per removal): old index per new row."""
    order = list(range(rows))
    for i in sorted(gone, reverse=True):
        order[i] = order[-1]
        order.pop()
    return order


class GenerateBatch:
    def __init__(self, backend, loaded: LoadedModel):
        self.backend = backend
        self.eos_ids = loaded.eos_token_ids
        self.tokenizer = loaded.tokenizer
        self.device = backend.logits_device  # the generators' device (with device_map, not the inputs')
        self.requests: list[Request] = []
        self.next_tokens: list[int] = []  # row i's last chosen token: fed by the next decode step

    @property
    def running(self) -> int:
        return len(self.requests)

    def fits(self, request: Request, admitted: list[Request]) -> bool:
        """Can `request` join now, beside the running rows and those admitted with it?"""
        return self.backend.fits(request, admitted)

    @torch.inference_mode()
    def prefill(self, newcomers: list[Request]) -> list[Request]:
        """Admit `newcomers`, choose their first tokens; -> those already finished."""
        for r in newcomers:
            r.generator = make_generator(r.params, self.device)
            r.text = TextStream(self.tokenizer, r.params.stop, live=r.stream)
        logits = self.backend.prefill(newcomers)
        first = len(self.requests)
        self.requests.extend(newcomers)
        self.next_tokens.extend([0] * len(newcomers))
        return self._advance(logits, first)

    @torch.inference_mode()
    def decode(self) -> list[Request]:
        """One decode step for every row; -> the requests that finished."""
        try:
            logits = self.backend.decode(self.next_tokens)
        except Exception:  # every row's state is in doubt (the scheduler fails them all): leave nothing behind
            self.backend.scrub(list(range(self.running)))
            raise
        return self._advance(logits, 0)

    def _advance(self, logits: torch.Tensor, first: int) -> list[Request]:
        """Sample rows first.. (logits [n, V] in that order); remove those that finished."""
        rows = self.requests[first:]
        try:
            tokens, finite = sample(logits, [r.params for r in rows], [r.generator for r in rows])
        except Exception:  # find the row(s) it fails for: sampled alone, the others still get their tokens
            tokens, finite = self._sample_alone(logits, rows)
        failed = []  # rows whose state may hold NaN or Inf: scrubbed before their slots are reused
        for j, r in enumerate(rows):
            if isinstance(finite[j], Exception):
                r.fail(finite[j])
                failed.append(first + j)
                continue
            if not finite[j]:  # never answer tokens chosen from NaN or Inf
                r.fail(non_finite_output())
                failed.append(first + j)
                continue
            try:
                r.add_token(tokens[j], self.eos_ids)
            except Exception as e:  # one bad row (its detokenization) must not sink its batch-mates
                r.fail(e)
            self.next_tokens[first + j] = tokens[j]
        if failed:
            self.backend.scrub(failed)
        finished = [r for r in rows if r.done]
        self.remove(finished)
        return finished

    @staticmethod
    def _sample_alone(logits: torch.Tensor, rows: list[Request]) -> tuple[list[int], list]:
        """Each row sampled on its own: a row whose sampling raises gets the exception in place of `finite`."""
        tokens, finite = [], []
        for j, r in enumerate(rows):
            try:
                (token,), (ok,) = sample(logits[j : j + 1], [r.params], [r.generator])
            except Exception as e:
                token, ok = 0, e
            tokens.append(token)
            finite.append(ok)
        return tokens, finite

    def remove(self, requests: list[Request]) -> None:
        """`requests` leave the batch; their rows are freed."""
        gone = {id(r) for r in requests}
        indices = [i for i, r in enumerate(self.requests) if id(r) in gone]
        if not indices:
            return
        order = order_after_removing(len(self.requests), indices)
        self.backend.keep(order)
        self.requests = [self.requests[i] for i in order]
        self.next_tokens = [self.next_tokens[i] for i in order]
