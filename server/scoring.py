"""From rendered sequences to model inputs, and from model outputs to label
scores. Shared by the runner (serving, under inference_mode) and the trainer
(with gradients into the prompt rows), so a trained prompt is scored exactly
as it will be served.

Virtual ids: a rendered sequence writes pseudo token i of its task as `V + i`
(V = rows of the input embedding matrix). For a batch, the distinct prompts'
rows are stacked into one table and each sequence's virtual ids are shifted
by its task's offset in that table; `embed` looks real ids up in the
embedding matrix and virtual ids in the table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import LoadedModel


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


def pack(seqs: list[list[int]], offsets: list[int], vocab_size: int, device: torch.device, left: bool = True):
    """Pad into ids [B, T], attention_mask [B, T] and position_ids [B, T]
    (positions count real tokens only); virtual ids of row b shift by offsets[b].
    Left padding (causal LMs: every row ends at T-1) or right padding (masked LMs
    and encoders, which then number positions themselves)."""
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, (seq, off) in enumerate(zip(seqs, offsets)):
        row = torch.tensor(seq, dtype=torch.long)
        span = slice(T - len(seq), T) if left else slice(0, len(seq))
        ids[b, span] = torch.where(row >= vocab_size, row + off, row)
        mask[b, span] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def embed(embed_tokens: torch.nn.Module, ids: torch.Tensor, table: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """ids [B, T] -> [B, T, H]; ids >= vocab_size read rows of `table` [R, H]."""
    virtual = ids >= vocab_size
    real = embed_tokens(ids.masked_fill(virtual, 0))
    if not virtual.any():
        return real
    soft = table[(ids - vocab_size).clamp(min=0, max=table.shape[0] - 1)]
    return torch.where(virtual.unsqueeze(-1), soft.to(real.dtype), real)


@dataclass
class LabelQuery:
    """One classification: a rendered input, its task's prompt rows and labels."""

    input_ids: list[int]
    rows: torch.Tensor  # [m, H]
    label_ids: tuple[tuple[int, ...], ...]  # verbalizer tokens per label
    head: tuple[torch.Tensor, torch.Tensor] | None = None  # encoder models: weight [L, H], bias [L]
    pooling: str = "mask"  # what the head reads: "mask" (the state at [MASK]) or "mean" (over the sequence)


class LabelScorer:
    """Per-label log-scores for a batch of LabelQuery, by model family:
    - causal: summed log-probability of each verbalizer after the input (one row per label);
    - masked: log-probability of each single-token verbalizer at the [MASK];
    - encoder: log-softmax of the task's linear head over a pooled last hidden state:
      the state at the [MASK] ("mask") or the mean over the sequence's positions ("mean")."""

    def __init__(self, loaded: LoadedModel):
        self.model = loaded.model
        self.family = loaded.family
        self.vocab_size = loaded.vocab_size
        self.mask_token_id = loaded.mask_token_id
        self.device = loaded.device
        self.embed_tokens = loaded.model.get_input_embeddings()

    def __call__(self, queries: list[LabelQuery]) -> list[torch.Tensor]:
        """-> one tensor [num_labels] per query (differentiable w.r.t. rows and head)."""
        if self.family == "causal":
            return self._causal(queries)
        return self._at_mask(queries)

    def _inputs(self, seqs: list[list[int]], rows: list[torch.Tensor]):
        """Causal LMs: left-padded, with position ids. Masked LMs and encoders:
        right-padded and no position ids, so a model whose positions do not start
        at 0 (RoBERTa starts after its padding index) numbers them its own way."""
        causal = self.family == "causal"
        table, offsets = prompt_table(rows)
        ids, mask, positions = pack(seqs, offsets, self.vocab_size, self.device, left=causal)
        inputs = dict(inputs_embeds=embed(self.embed_tokens, ids, table, self.vocab_size), attention_mask=mask)
        if causal:
            inputs["position_ids"] = positions
        return ids, inputs

    def _causal(self, queries: list[LabelQuery]) -> list[torch.Tensor]:
        seqs, rows, verbalizers = [], [], []
        for q in queries:
            for label_ids in q.label_ids:
                seqs.append(q.input_ids + list(label_ids))
                rows.append(q.rows)
                verbalizers.append(label_ids)
        _, inputs = self._inputs(seqs, rows)
        K = max(len(v) for v in verbalizers)
        # logits of the last K+1 positions: kept index t is sequence index T-K-1+t
        logp = torch.log_softmax(self.model(**inputs, logits_to_keep=K + 1).logits.float(), dim=-1)
        picked = []
        for r, verbalizer in enumerate(verbalizers):
            k = len(verbalizer)
            # verbalizer token j sits at T-k+j and is predicted at T-k+j-1, kept index K-k+j
            targets = torch.tensor(verbalizer, device=logp.device)
            picked.append(logp[r, torch.arange(K - k, K, device=logp.device), targets].sum())
        out, start = [], 0
        for q in queries:
            out.append(torch.stack(picked[start : start + len(q.label_ids)]))
            start += len(q.label_ids)
        return out

    def _at_mask(self, queries: list[LabelQuery]) -> list[torch.Tensor]:
        ids, inputs = self._inputs([q.input_ids for q in queries], [q.rows for q in queries])
        at = (ids == self.mask_token_id).int().argmax(dim=1)  # [B]: the one [MASK] of each row
        batch = torch.arange(len(queries), device=ids.device)
        out = self.model(**inputs)
        if self.family == "masked":
            logp = torch.log_softmax(out.logits[batch, at].float(), dim=-1)  # [B, V]
            return [logp[b, [v[0] for v in q.label_ids]] for b, q in enumerate(queries)]
        states = out.last_hidden_state.float()  # [B, T, H]
        at_mask = states[batch, at]  # [B, H]
        mask = inputs["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]: padding is right of each row
        mean = (states * mask).sum(dim=1) / mask.sum(dim=1)  # [B, H]
        pooled = [mean[b] if q.pooling == "mean" else at_mask[b] for b, q in enumerate(queries)]
        return [torch.log_softmax(q.head[0].float() @ h + q.head[1].float(), dim=-1) for h, q in zip(pooled, queries)]
