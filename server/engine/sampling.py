"""Choosing the next token for every row of a batch in one vectorised pass.

Greedy rows take the argmax. Sampling rows (temperature > 0) are scaled by their
temperature, cut to their top-k and top-p candidates, and drawn by an exponential
race: token = argmax(p / q) with q ~ Exp(1) from the row's own generator, which
picks token i with probability p_i. Each row's candidates and noise have a width
fixed by its own params (k, or the whole vocabulary), never by its batch-mates,
so a seeded row gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import torch

from ptcore.errors import InvalidRequest
from ptcore.inputs import on_device
from server.engine.request import SamplingParams


def non_finite_output() -> InvalidRequest:
    """The error of a request whose logits or scores came out NaN or Inf."""
    return InvalidRequest(
        "the model's output for this request is NaN or Inf (the task's prompt rows or this input overflow "
        "the model's arithmetic): no answer was produced"
    )


VOCAB, SORTED_VOCAB = 0, -1  # candidate layouts of rows without a top-k (see sample)


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    """The random stream of one request: None for greedy, else seeded from
    params.seed, or from a fresh random seed when it is None."""
    if params.temperature == 0:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[list[int], list[bool]]:
    """logits: [B, V], any float dtype, one row per request.
    -> (the chosen token of each row, whether each row's logits were all finite).
    A non-finite row's token means nothing: the caller fails that row.
    One host sync in all: the final .tolist()."""
    # max and min propagate NaN, so one pass each tells argmax and finiteness
    best, greedy = logits.max(dim=-1)  # [B], [B]
    finite = best.isfinite() & logits.amin(dim=-1).isfinite()  # [B]
    tokens = greedy
    vocab = logits.shape[-1]
    # rows grouped by how their candidates are laid out, which only their own params decide:
    # k > 0: their k best, SORTED_VOCAB: the vocabulary sorted (for top-p), VOCAB: the vocabulary as is
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        if p.temperature > 0:
            layout = p.top_k if 0 < p.top_k < vocab else SORTED_VOCAB if p.top_p < 1 else VOCAB
            groups.setdefault(layout, []).append(i)
    if groups:
        tokens = greedy.clone()
        for layout, rows in groups.items():
            index = on_device(rows, logits.device)
            x = logits if len(rows) == len(params) else logits.index_select(0, index)  # all rows: no copy
            chosen = _sample_rows(x.float(), layout, [params[i] for i in rows], [generators[i] for i in rows])
            tokens.index_copy_(0, index, chosen)
    chosen, ok = torch.stack([tokens, finite.long()]).tolist()
    return chosen, [bool(f) for f in ok]


def _sample_rows(
    x: torch.Tensor, layout: int, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Draw one token per row of x: [G, V] float32, rows of one candidate layout. -> [G] token ids."""
    device = x.device
    temperature = on_device([p.temperature for p in params], device, torch.float32).unsqueeze(1)  # [G, 1]
    # inf: no top-p cut for that row (so a row's cut never depends on a batch-mate's)
    top_p = on_device([p.top_p if p.top_p < 1 else float("inf") for p in params], device, torch.float32).unsqueeze(1)
    cut = any(p.top_p < 1 for p in params)
    ids = None  # candidate position -> token id; None: candidates are the vocabulary in order
    if layout > 0:
        x, ids = x.topk(layout, dim=-1)  # [G, k], best first
    elif layout == SORTED_VOCAB:
        x, ids = x.sort(dim=-1, descending=True, stable=True)  # [G, V], best first, ties by token id
    x = x / temperature
    weight = (x - x.amax(dim=-1, keepdim=True)).exp_()  # [G, W]: probabilities times a per-row constant
    if cut:
        # keep the smallest prefix whose mass reaches top_p, and always the first candidate:
        # a top_p below float32's smallest value (1e-46) rounds to 0 and would drop it
        mass = weight.cumsum(dim=-1)  # [G, W]
        before = mass - weight
        drop = before >= top_p * mass[:, -1:]
        drop[:, 0] = False
        weight = weight.masked_fill_(drop, 0.0)
    noise = torch.empty_like(weight)
    for row, generator in enumerate(generators):
        noise[row].exponential_(generator=generator)
    # an Exp(1) draw of exactly 0 would give 0/0 on a dropped candidate: clamp it away
    position = (weight / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)  # [G]
    return position if ids is None else ids.gather(1, position.unsqueeze(1)).squeeze(1)
