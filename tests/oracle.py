"""The correctness oracle (DESIGN.md): one request computed ALONE, with no KV
cache and no padding, from inputs_embeds = render(template, h, x), recomputing
the whole sequence at every step. Written independently of server/engine/runner.py."""

from __future__ import annotations

import torch


def alone_embeds(model, rows: torch.Tensor, ids: list[int], vocab_size: int) -> torch.Tensor:
    """[1, T, H]: real ids embed normally, pseudo token i (id vocab_size + i) is rows[i]."""
    table = model.get_input_embeddings().weight
    vecs = [rows[i - vocab_size] if i >= vocab_size else table[i] for i in ids]
    return torch.stack(vecs).unsqueeze(0)


@torch.no_grad()
def alone_greedy(model, rows, ids, vocab_size, max_new_tokens, eos_ids) -> list[int]:
    embeds = alone_embeds(model, rows, ids, vocab_size)
    table = model.get_input_embeddings().weight
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
        token = int(logits.argmax())
        if token in eos_ids:
            break
        out.append(token)
        embeds = torch.cat([embeds, table[token].view(1, 1, -1)], dim=1)
    return out


@torch.no_grad()
def alone_label_logprobs(model, rows, ids, vocab_size, label_ids) -> list[float]:
    """Summed log-probability of each label's verbalizer tokens after `ids`."""
    scores = []
    for verbalizer in label_ids:
        embeds = alone_embeds(model, rows, ids + list(verbalizer), vocab_size)
        logp = torch.log_softmax(model(inputs_embeds=embeds, use_cache=False).logits[0].float(), dim=-1)
        n = len(ids)
        scores.append(sum(float(logp[n - 1 + j, t]) for j, t in enumerate(verbalizer)))
    return scores


def alone_label_scores(model, rows, ids, vocab_size, label_ids) -> list[float]:
    """Label probabilities: softmax over the labels' summed log-probabilities."""
    logprobs = alone_label_logprobs(model, rows, ids, vocab_size, label_ids)
    return torch.softmax(torch.tensor(logprobs, dtype=torch.float64), dim=0).tolist()
