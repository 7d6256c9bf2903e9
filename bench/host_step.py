"""Host time per decode step outside the forward: what the scheduler does
between two steps (sampling, each row's token bookkeeping, its text, stop
strings, streaming) for --rows running rows. On a GPU the step itself is one
CUDA-graph replay of about 2 ms at 64 rows, and this time is added to it.

The model is a tiny random Llama on the CPU (its forward is timed and taken
out); the tokenizer is the default model's if it is in the model cache (as
`ptserve serve` leaves it), else --tokenizer DIR. Three kinds of request:
plain (no stop strings, not streamed), stop (two stop strings that never
appear) and streamed (text handed to a callback after every step).

    python -m bench.host_step --rows 64 --steps 128
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from types import SimpleNamespace

import torch
from transformers import AutoTokenizer

from bench.engine import build, make_batcher, make_requests, scheduler_for
from ptcore.model_source import DEFAULT_MODEL, DEFAULT_MODEL_CACHE, ModelCache
from server.engine.request import Request
from server.engine.stats import BatchStats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the cached default model's)")
    args = ap.parse_args()
    cache = ModelCache(os.environ.get("PTSERVE_MODEL_CACHE") or DEFAULT_MODEL_CACHE)
    path = args.tokenizer or cache.get(DEFAULT_MODEL.sha256)
    if path is None:
        ap.error("the default model is not in the model cache (`ptserve serve` once converts it); pass --tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    loaded = build("tiny", "cpu", torch.float32)
    loaded = dataclasses.replace(loaded, tokenizer=tokenizer)
    shape = SimpleNamespace(max_running=args.rows, max_wait_ms=0, prompt_len=20, input_len=64, new_tokens=args.steps)
    batch = make_batcher(loaded, shape, graphs=False)
    forward = [0.0]
    decode = batch.backend.decode

    def timed_decode(tokens):
        start = time.perf_counter()
        logits = decode(tokens)
        forward[0] += time.perf_counter() - start
        return logits

    batch.backend.decode = timed_decode
    base = make_requests(loaded, 8, args.rows, 20, 64, args.steps)
    kinds = {
        "plain": lambda: [Request.generate(p, ids, params) for p, ids, params in base],
        "stop": lambda: [
            Request.generate(p, ids, dataclasses.replace(params, stop=("\x00never", "also never")))
            for p, ids, params in base
        ],  # fmt: skip
        "streamed": lambda: [streamed(Request.generate(p, ids, params)) for p, ids, params in base],
    }
    print(f"# host time per decode step outside the forward: {args.rows} rows, {args.steps} steps, "
          f"tokenizer {type(tokenizer).__name__} ({path}), torch {torch.__version__}")  # fmt: skip
    print("| requests | ms per step (median of runs) | runs |\n|---|---|---|")
    for kind, make in kinds.items():
        runs = []
        for _ in range(args.repeats + 1):  # the first warms up
            scheduler = scheduler_for(batch, shape, BatchStats())
            requests = make()
            forward[0] = 0.0
            start = time.perf_counter()
            scheduler.run_to_completion(requests)
            runs.append(1000 * (time.perf_counter() - start - forward[0]) / args.steps)
        runs = runs[1:]
        print(f"| {kind} | {statistics.median(runs):.3f} | {' '.join(f'{x:.3f}' for x in runs)} |", flush=True)


def streamed(request: Request) -> Request:
    request.stream = True
    return request


if __name__ == "__main__":
    main()
