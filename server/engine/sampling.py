"""Choosing the next token and deciding when a row is done, per request."""

from __future__ import annotations

import torch

from prompt_store.errors import InvalidRequest
from server.engine.request import GenerateResult, SamplingParams


def non_finite_output() -> InvalidRequest:
    """The error of a request whose logits or scores came out NaN or Inf."""
    return InvalidRequest(
        "the model's output for this request is NaN or Inf (the task's prompt rows or this input overflow "
        "the model's arithmetic): no answer was produced"
    )


class RowDecoder:
    """One generating row: its sampling state, its tokens so far, its stop rules."""

    def __init__(self, params: SamplingParams, eos_ids: frozenset[int], tokenizer, device: torch.device,
                 on_token=None):  # fmt: skip
        """on_token(token_ids): called with the tokens so far after each new token
        that does not end the row (streaming; the final text comes with the result)."""
        self.params = params
        self.on_token = on_token
        self.eos_ids = eos_ids
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.text: str | None = None
        self.error: Exception | None = None
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def sample(self, logits: torch.Tensor) -> int:
        """logits: [V] float32 of this row (only called when temperature > 0)."""
        p = self.params
        logits = logits / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p, and always the first token:
            # a top_p below float32's smallest value (1e-46) compares as 0 and would drop it
            drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= p.top_p
            drop[0] = False
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def push(self, token: int) -> None:
        if token in self.eos_ids:
            self.finish_reason = "stop"
        else:
            self.token_ids.append(token)
            if self.params.stop:
                text = self._decode()
                hits = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
                if hits:
                    self.text = text[: min(hits)]
                    self.finish_reason = "stop"
                    return
            if len(self.token_ids) >= self.params.max_new_tokens:
                self.finish_reason = "length"
        if self.done and self.text is None:
            self.text = self._decode()
        if not self.done and self.on_token is not None:  # a finished row's text goes with its result
            self.on_token(tuple(self.token_ids))

    def _decode(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def fail(self, error: Exception) -> None:
        """End this row with `error` as its result."""
        self.error, self.finish_reason = error, "error"

    def result(self) -> GenerateResult | Exception:
        if self.error is not None:
            return self.error
        return GenerateResult(self.token_ids, self.text or "", self.finish_reason or "length")


def step_rows(logits: torch.Tensor, rows: list[RowDecoder]) -> tuple[list[int], list[int]]:
    """Choose and record one token per unfinished row. logits: [B, V].
    -> (the chosen tokens, 0 for rows already done; indices of rows that finished
    now). Greedy rows share one argmax; sampling rows use their own generator. A
    row whose sampling fails finishes with its exception; the others go on. A row
    whose logits hold NaN or Inf fails rather than answer meaningless tokens."""
    finite = torch.isfinite(logits).all(dim=-1)
    greedy = torch.where(finite, logits.argmax(dim=-1), -1).tolist()  # -1: not finite (still one sync)
    chosen = [0] * len(rows)
    finished = []
    for i, row in enumerate(rows):
        if row.done:
            continue
        if greedy[i] < 0:
            row.fail(non_finite_output())
            finished.append(i)
            continue
        try:
            chosen[i] = row.sample(logits[i].float()) if row.params.temperature > 0 else greedy[i]
            row.push(chosen[i])
        except Exception as e:  # one bad row must not sink its batch-mates
            row.fail(e)
        if row.done:
            finished.append(i)
    return chosen, finished


# --- PLACEHOLDER new API until the vectorised version lands (branch `sampling`) ---
def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    g = torch.Generator(device=device)
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> tuple[list[int], list[bool]]:
    finite = torch.isfinite(logits).all(dim=-1)
    greedy = torch.where(finite, logits.argmax(dim=-1), -1).tolist()
    tokens = []
    for i, (p, g) in enumerate(zip(params, generators)):
        if greedy[i] < 0 or p.temperature == 0:
            tokens.append(max(greedy[i], 0))
            continue
        r = RowDecoder.__new__(RowDecoder)
        r.params, r.generator = p, g
        tokens.append(r.sample(logits[i].float()))
    return tokens, [t >= 0 for t in greedy]
