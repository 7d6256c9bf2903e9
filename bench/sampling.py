"""Time of one sampling step: the old per-row path (the loop of step_rows over
RowDecoders that issue 12 replaced, kept here as `per_row` to compare with)
against the batched sample(), on the same logits, at batch 64 and a SmolLM2-sized
vocabulary, for all-greedy, all-sampled and half/half batches. CPU; each case is
timed old/new alternately and the medians are reported.

    python -m bench.sampling [--batch 64] [--vocab 49152] [--repeats 15] [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import date

import torch

from bench.report import report
from server.engine.request import SamplingParams
from server.engine.sampling import make_generator, sample

GREEDY = SamplingParams(max_new_tokens=10**9)
SAMPLED = SamplingParams(max_new_tokens=10**9, temperature=0.8, top_p=0.9, top_k=50)


def cases(batch: int) -> dict[str, list[SamplingParams]]:
    half = batch // 2
    return {
        "all greedy": [GREEDY] * batch,
        "all sampled (T 0.8, top_p 0.9, top_k 50)": [SAMPLED] * batch,
        "half greedy, half sampled": [GREEDY] * half + [SAMPLED] * (batch - half),
    }


def seeded(params: list[SamplingParams]) -> list[SamplingParams]:
    return [SamplingParams(**{**vars(p), "seed": i}) for i, p in enumerate(params)]


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def per_row(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """The replaced path: one argmax for the batch, then per sampling row its own
    softmax, top-k, sorted top-p and multinomial draw."""
    greedy = torch.where(torch.isfinite(logits).all(dim=-1), logits.argmax(dim=-1), -1).tolist()
    chosen = []
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.temperature == 0:
            chosen.append(greedy[i])
            continue
        row = logits[i].float() / p.temperature
        if 0 < p.top_k < row.shape[-1]:
            row = row.masked_fill(row < torch.topk(row, p.top_k).values[-1], float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= p.top_p
            drop[0] = False
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(drop, 0.0))
        chosen.append(int(torch.multinomial(probs, 1, generator=g)))
    return chosen


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49_152)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--write", action="store_true", help="also save the table under bench/results/")
    args = parser.parse_args()

    logits = torch.randn(args.batch, args.vocab, generator=torch.Generator().manual_seed(0)) * 4  # [B, V]
    lines = [
        f"# sampling step, {date.today()}, {platform.node()} ({platform.machine()}, CPU, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads)",
        f"batch={args.batch} vocab={args.vocab} float32 logits; median of {args.repeats} repeats, "
        "old and new alternating; `python -m bench.sampling --write`",
        "",
        "| batch | old: per-row loop ms | new: sample() ms | speed-up |",
        "|---|---|---|---|",
    ]
    for name, params in cases(args.batch).items():
        params = seeded(params)
        generators = [make_generator(p, "cpu") for p in params]
        per_row(logits, params, generators), sample(logits, params, generators)  # warm-up
        old, new = [], []
        for _ in range(args.repeats):
            old.append(timed(per_row, logits, params, generators))
            new.append(timed(sample, logits, params, generators))
        old_ms, new_ms = 1000 * statistics.median(old), 1000 * statistics.median(new)
        lines.append(f"| {name} | {old_ms:.1f} | {new_ms:.1f} | {old_ms / new_ms:.1f}x |")
    lines += [
        "",
        "The machine's 2 cores are shared with other work, so absolute times move between runs; "
        "old and new are timed alternately so both see the same load.",
    ]
    report(lines, "sampling", args.write)


if __name__ == "__main__":
    main()
