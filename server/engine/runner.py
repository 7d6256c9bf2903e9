"""The model runner: executes one batch of generate or classify work.

It sees only batches; queues, HTTP and stores are elsewhere. Tasks mix freely
inside a batch through virtual token ids (ptcore/scoring.py). Sequences are
left-padded, and position ids count real tokens only, so absolute-position
and rotary models see what they would see alone.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache

from prompt_store.errors import Abandoned
from ptcore.inputs import embed, pack, prompt_table
from ptcore.model import LoadedModel
from ptcore.scoring import LabelQuery, LabelScorer
from server.engine.request import ClassifyResult, ClassifyWork, GenerateResult, GenerateWork
from server.engine.sampling import RowDecoder, non_finite_output, step_rows

log = logging.getLogger(__name__)


OnFinish = Callable[[int, "GenerateResult | Exception"], None]


class ModelRunner:
    def __init__(self, loaded: LoadedModel, max_classify_rows: int = 256):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.vocab_size = loaded.vocab_size
        self.embed_tokens = loaded.model.get_input_embeddings()
        self.eos_ids = loaded.eos_token_ids
        self.score_labels = LabelScorer(loaded)
        self.max_classify_rows = max_classify_rows  # bounds one classify forward: (request, label) rows
        # transformers renamed forward(past_key_values=) to forward(cache=) during 5.x
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # -- generate ----------------------------------------------------------

    def prefill(self, works: list[GenerateWork]):
        """Run the padded batch's inputs once. -> (output with last-position
        logits [B, 1, V], KV cache, attention_mask [B, T], last positions [B, 1])."""
        table, offsets = prompt_table([w.prompt.rows for w in works])
        ids, mask, positions = pack([w.input_ids for w in works], offsets, self.vocab_size, self.device)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            inputs_embeds=embed(self.embed_tokens, ids, table, self.vocab_size),
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        return out, cache, mask, positions[:, -1:]

    @torch.inference_mode()
    def generate(
        self, works: list[GenerateWork], on_finish: OnFinish | None = None
    ) -> list[GenerateResult | Exception]:
        """Greedy/sampled continuation of every work. `on_finish(i, result)` is
        called as soon as row i is done, so a short request need not wait for the
        batch's longest. A row whose sampling fails gets its exception as result;
        the other rows go on."""
        rows = [RowDecoder(w.params, self.eos_ids, self.tokenizer, self.device, w.on_token) for w in works]
        results: list[GenerateResult | Exception | None] = [None] * len(works)

        def finish(i: int, result: GenerateResult | Exception) -> None:
            results[i] = result
            if on_finish is not None:
                on_finish(i, result)

        out, cache, mask, positions = self.prefill(works)
        for _ in range(max(w.params.max_new_tokens for w in works)):
            for i, (w, row) in enumerate(zip(works, rows)):
                if w.abandoned and not row.done:  # its client left: stop spending steps on it
                    row.fail(Abandoned("the request was abandoned"))
                    finish(i, row.error)
            if all(row.done for row in rows):
                break
            next_ids, finished = step_rows(out.logits[:, -1, :], rows)
            if works[0].first_token_at is None:
                now = time.monotonic()
                for w in works:
                    w.first_token_at = now
            for i in finished:
                finish(i, rows[i].result())
            if all(row.done for row in rows):
                break
            # decode: one token per row; finished rows ride along and are ignored
            step = torch.tensor(next_ids, device=self.device).unsqueeze(1)  # [B, 1]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions + 1
            out = self.model(
                inputs_embeds=self.embed_tokens(step),
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **{self._cache_kw: cache},
            )
        return results

    # -- classify ----------------------------------------------------------

    @torch.inference_mode()
    def classify(self, works: list[ClassifyWork]) -> list[ClassifyResult | Exception]:
        """Label probabilities: the softmax over each request's label scores
        (ptcore/scoring.py), in forward passes of at most max_classify_rows rows.
        A request whose scores are not finite gets an error as its result."""
        scores: list[torch.Tensor] = []
        for chunk in self._classify_chunks(works):
            queries = [
                LabelQuery(w.input_ids, w.prompt.rows, w.prompt.label_ids, w.prompt.head, w.prompt.head_pooling)
                for w in chunk
            ]
            scores.extend(self.score_labels(queries))
        results: list[ClassifyResult | Exception] = []
        for w, s in zip(works, scores):
            if not torch.isfinite(s).all():  # never answer a NaN probability
                results.append(non_finite_output())
                continue
            s = s.double()
            probs = dict(zip(w.prompt.labels, torch.softmax(s, dim=0).tolist()))
            logprobs = dict(zip(w.prompt.labels, s.tolist()))
            results.append(ClassifyResult(label=max(probs, key=probs.get), scores=probs, logprobs=logprobs))
        return results

    def _classify_chunks(self, works: list[ClassifyWork]) -> list[list[ClassifyWork]]:
        """A causal LM runs one row per (request, label); other families one per request."""
        per_work = [len(w.prompt.label_ids) if self.score_labels.family == "causal" else 1 for w in works]
        chunks: list[list[ClassifyWork]] = [[]]
        used = 0
        for w, n in zip(works, per_work):
            if chunks[-1] and used + n > self.max_classify_rows:
                chunks.append([])
                used = 0
            chunks[-1].append(w)
            used += n
        return chunks
