"""The model runner: executes one batch of generate or classify work.

It sees only batches; queues, HTTP and stores are elsewhere. Tasks mix freely
inside a batch through virtual token ids: a rendered sequence writes pseudo
token i of its task as `V + i` (V = rows of the input embedding matrix). For a
batch, the runner stacks the rows of the batch's distinct prompts into one
table and shifts each sequence's virtual ids by its task's offset in that
table; `embed` then looks real ids up in the embedding matrix and virtual ids
in the table. Sequences are left-padded, and position ids count real tokens
only, so absolute-position and rotary models see what they would see alone.
"""

from __future__ import annotations

import inspect
import logging

import torch
from transformers import DynamicCache

from .model import LoadedModel
from .prompts import TaskPrompt
from .sampling import RowDecoder, choose_next_tokens
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
        # transformers renamed forward(past_key_values=) to forward(cache=) during 5.x
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # -- building the batch ------------------------------------------------

    def _prompt_table(self, prompts: list[TaskPrompt]) -> tuple[torch.Tensor, list[int]]:
        """Rows of the distinct prompts, stacked: table [R, H], and each
        prompt's first row in it (same order as `prompts`)."""
        first_row: dict[int, int] = {}
        blocks: list[torch.Tensor] = []
        offsets: list[int] = []
        total = 0
        for p in prompts:
            if id(p) not in first_row:
                first_row[id(p)] = total
                blocks.append(p.rows)
                total += p.rows.shape[0]
            offsets.append(first_row[id(p)])
        return torch.cat(blocks), offsets

    def _pack(self, seqs: list[list[int]], offsets: list[int]):
        """Left-pad sequences into ids [B, T], attention_mask [B, T], position_ids [B, T];
        virtual ids of sequence b are shifted by offsets[b]."""
        V = self.vocab_size
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for b, (seq, off) in enumerate(zip(seqs, offsets)):
            row = torch.tensor(seq, dtype=torch.long)
            row = torch.where(row >= V, row + off, row)
            ids[b, T - len(seq) :] = row
            mask[b, T - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> embeddings [B, T, H]; ids >= V read rows of `table` [R, H]."""
        V = self.vocab_size
        virtual = ids >= V
        real = self.embed_tokens(ids.masked_fill(virtual, 0))
        if not virtual.any():
            return real
        soft = table[(ids - V).clamp(min=0, max=table.shape[0] - 1)]
        return torch.where(virtual.unsqueeze(-1), soft.to(real.dtype), real)

    # -- generate ----------------------------------------------------------

    @torch.inference_mode()
    def generate(self, works: list[GenerateWork]) -> list[GenerateResult]:
        table, offsets = self._prompt_table([w.prompt for w in works])
        ids, mask, positions = self._pack([w.input_ids for w in works], offsets)
        rows = [RowDecoder(w.params, self.eos_ids, self.tokenizer, self.device) for w in works]
        cache = DynamicCache(config=self.model.config)

        # prefill: the whole padded batch at once; only the last position's logits are needed
        out = self.model(
            inputs_embeds=self.embed(ids, table),
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        positions = positions[:, -1:]  # [B, 1]
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
        """One row per (request, label): the rendered input followed by the label's
        verbalizer. A label's score is the summed log-probability of its
        verbalizer tokens; probabilities are the softmax over a request's labels."""
        seqs, offsets, owners, verbalizers = [], [], [], []
        table, prompt_offsets = self._prompt_table([w.prompt for w in works])
        for i, (w, off) in enumerate(zip(works, prompt_offsets)):
            for label_ids in w.prompt.label_ids:
                seqs.append(w.input_ids + list(label_ids))
                offsets.append(off)
                owners.append(i)
                verbalizers.append(label_ids)
        ids, mask, positions = self._pack(seqs, offsets)
        K = max(len(v) for v in verbalizers)
        # keep logits of the last K+1 positions: kept index t is sequence index T-K-1+t
        out = self.model(
            inputs_embeds=self.embed(ids, table), attention_mask=mask, position_ids=positions, logits_to_keep=K + 1
        )
        logp = torch.log_softmax(out.logits.float(), dim=-1)  # [N, K+1, V]
        scores: list[list[float]] = [[] for _ in works]
        for r, verbalizer in enumerate(verbalizers):
            k = len(verbalizer)
            # verbalizer token j sits at T-k+j and is predicted at T-k+j-1, kept index K-k+j
            picked = logp[r, torch.arange(K - k, K), torch.tensor(verbalizer, device=logp.device)]
            scores[owners[r]].append(float(picked.sum()))
        results = []
        for w, s in zip(works, scores):
            probs = torch.softmax(torch.tensor(s, dtype=torch.float64), dim=0).tolist()
            by_label = dict(zip(w.prompt.labels, probs))
            results.append(
                ClassifyResult(
                    label=max(by_label, key=by_label.get), scores=by_label, logprobs=dict(zip(w.prompt.labels, s))
                )
            )
        return results
