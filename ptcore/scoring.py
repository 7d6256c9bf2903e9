"""From model outputs to label scores, per model family. Shared by the server
(under inference_mode) and the trainer (with gradients into the prompt rows),
so a trained prompt is scored exactly as it will be served. Inputs are built
by ptcore/inputs.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptcore.inputs import embed, on_device, pack, prompt_table
from ptcore.model import LoadedModel


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
            targets = on_device(list(verbalizer), logp.device)
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
