"""The model runner: executes one batch of generate or classify work.

It sees only batches; queues, HTTP and stores are elsewhere. Tasks mix freely
inside a batch through virtual token ids (server/scoring.py). Sequences are
left-padded, and position ids count real tokens only, so absolute-position
and rotary models see what they would see alone.
"""

from __future__ import annotations

import inspect
import logging

import torch
from transformers import DynamicCache

from .model import LoadedModel
from .sampling import RowDecoder, choose_next_tokens
from .scoring import LabelQuery, LabelScorer, embed, pack, prompt_table
from .work import ClassifyResult, ClassifyWork, GenerateResult, GenerateWork

log = logging.getLogger(__name__)


def eos_token_ids(loaded: LoadedModel) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(loaded.model, "generation_config", None), loaded.model.config, loaded.tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


class ModelRunner:
    def __init__(self, loaded: LoadedModel):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.vocab_size = loaded.vocab_size
        self.embed_tokens = loaded.model.get_input_embeddings()
        self.eos_ids = eos_token_ids(loaded)
        self.score_labels = LabelScorer(loaded)
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
    def generate(self, works: list[GenerateWork]) -> list[GenerateResult]:
        rows = [RowDecoder(w.params, self.eos_ids, self.tokenizer, self.device) for w in works]
        out, cache, mask, positions = self.prefill(works)
        for _ in range(max(w.params.max_new_tokens for w in works)):
            next_ids = choose_next_tokens(out.logits[:, -1, :], rows)
            for row, token in zip(rows, next_ids):
                if not row.done:
                    row.push(token)
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
        return [GenerateResult(row.token_ids, row.text or "", row.finish_reason or "length") for row in rows]

    # -- classify ----------------------------------------------------------

    @torch.inference_mode()
    def classify(self, works: list[ClassifyWork]) -> list[ClassifyResult]:
        """Label probabilities: the softmax over each request's label scores (server/scoring.py)."""
        queries = [LabelQuery(w.input_ids, w.prompt.rows, w.prompt.label_ids, w.prompt.head) for w in works]
        results = []
        for w, scores in zip(works, self.score_labels(queries)):
            logprobs = scores.double().tolist()
            probs = torch.softmax(scores.double(), dim=0).tolist()
            by_label = dict(zip(w.prompt.labels, probs))
            results.append(
                ClassifyResult(
                    label=max(by_label, key=by_label.get),
                    scores=by_label,
                    logprobs=dict(zip(w.prompt.labels, logprobs)),
                )
            )
        return results
