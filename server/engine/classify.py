"""Classify requests: label probabilities from the label scores of
ptcore/scoring.py, in forward passes of a bounded number of rows."""

from __future__ import annotations

import torch

from ptcore.model import LoadedModel
from ptcore.scoring import LabelQuery, LabelScorer
from server.engine.request import ClassifyResult, Request
from server.engine.sampling import non_finite_output


class Classifier:
    def __init__(self, loaded: LoadedModel, max_rows: int = 256):
        """max_rows bounds one forward pass: a causal LM runs one row per
        (request, label), other families one per request."""
        self.score_labels = LabelScorer(loaded)
        self.max_rows = max_rows

    @torch.inference_mode()
    def run(self, requests: list[Request]) -> list[ClassifyResult | Exception]:
        """One result per request, in order: the softmax over its label scores, or
        an error when its scores are not finite (never a NaN probability)."""
        scores: list[torch.Tensor] = []
        for chunk in self._chunks(requests):
            queries = [LabelQuery(r.input_ids, r.prompt.rows, r.prompt.label_ids, r.prompt.head, r.prompt.head_pooling)
                       for r in chunk]  # fmt: skip
            scores.extend(self.score_labels(queries))
        results: list[ClassifyResult | Exception] = []
        for r, s in zip(requests, scores):
            if not torch.isfinite(s).all():
                results.append(non_finite_output())
                continue
            s = s.double()
            probs = dict(zip(r.prompt.labels, torch.softmax(s, dim=0).tolist()))
            logprobs = dict(zip(r.prompt.labels, s.tolist()))
            results.append(ClassifyResult(max(probs, key=probs.get), probs, logprobs, r.prompt.version))
        return results

    def _chunks(self, requests: list[Request]) -> list[list[Request]]:
        causal = self.score_labels.family == "causal"
        chunks: list[list[Request]] = [[]]
        used = 0
        for r in requests:
            n = len(r.prompt.label_ids) if causal else 1
            if chunks[-1] and used + n > self.max_rows:
                chunks.append([])
                used = 0
            chunks[-1].append(r)
            used += n
        return chunks
