"""Decode step time and kernels per step, at several numbers of running rows.

For each way of running the step (on CUDA: CUDA graphs, and graphs over a
torch.compile'd step; elsewhere: eager, and compiled), one engine is built
with --max-running slots, then for each row count n: n requests are admitted
(--prompt-len pseudo + --input-len input tokens each) and two times are taken,
each the median of --repeats:

  step ms     the decode step alone (server/engine/decode_step.py: inputs in, logits
              out), timed with CUDA events on CUDA;
  engine ms   one whole engine step: the decode step plus choosing the tokens
              and the host's per-row bookkeeping (GenerateBatch.decode).

Kernels per step are counted on one step run outside any graph (a graph
replays the same kernels): CUDA kernels from the profiler on CUDA, computing
aten operators on the CPU (bench/step_ops.py explains the count; a compiled
step's kernels are not countable on the CPU).

    python -m bench.step_time --shape llama-1b --dtype bfloat16 --rows 1 8 32 64   # a GPU
    python -m bench.step_time --shape tiny --rows 1 4 --repeats 3                    # smoke, CPU

Each result is also printed as a `RESULT {json}` line (bench/gpu_summary.py reads them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from bench.engine import SHAPES, build, make_batcher, make_requests
from bench.step_ops import CountOps
from server.engine.batch import GenerateBatch
from server.engine.request import Request


def timed_ms(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def kernels_per_step(batch: GenerateBatch, tokens: list[int], positions: list[int], compiled: bool):
    """Kernels (CUDA) or computing operators (CPU) of one step outside any graph; None where not countable."""
    step = batch.backend.decode_step
    n = len(tokens)
    step.inputs[:, :n].copy_(torch.tensor([tokens, positions]))
    args = (step.inputs[0, :n], step.inputs[1, :n], max(positions) + 1)
    if batch.device.type == "cuda":
        step.forward(*args)  # compiled: this shape's code is ready before the count
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step.forward(*args)
            torch.cuda.synchronize()
        kinds = Counter(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        return sum(v for k, v in kinds.items() if not k.startswith(("Memcpy", "Memset")))
    if compiled:
        return None
    with CountOps() as counter:
        step.forward(*args)
    return sum(counter.counts.values())


def measure(loaded, args, graphs: bool, compiled: bool) -> list[dict]:
    start = time.monotonic()
    batch = make_batcher(loaded, args, graphs=graphs, compile=compiled)
    built = time.monotonic() - start
    how = ("graphs" if batch.backend.decode_step.use_graphs else "eager") + (" + compile" if compiled else "")
    rows = []
    for n in args.rows:
        batch.remove(list(batch.requests))  # a fresh batch: admission overwrites the slots it takes
        requests = make_requests(loaded, min(n, 8), n, args.prompt_len, args.input_len, args.new_tokens)
        batch.prefill([Request.generate(p, ids, params) for p, ids, params in requests])
        tokens = list(batch.next_tokens)
        positions = list(batch.backend.lengths)  # the same step each time: it rewrites one position
        step_ms = timed_ms(lambda t=tokens, p=positions: batch.backend.decode_step(t, p), loaded.device, args.repeats)
        engine_ms = timed_ms(lambda: batch.decode(), loaded.device,
                             min(args.repeats, args.new_tokens - 3))  # fmt: skip
        row = {"how": how, "rows": n, "step_ms": step_ms, "engine_ms": engine_ms,
               "kernels": kernels_per_step(batch, tokens, positions, compiled), "build_s": built}  # fmt: skip
        print("RESULT " + json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--prompt-len", type=int, default=20)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128, help="sets the cache length, as in bench/engine.py")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled step")
    args = ap.parse_args()
    args.max_running = max(args.rows)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    loaded = build(args.shape, args.device, dtype)
    results = measure(loaded, args, graphs=True, compiled=False)
    if args.compile:
        results += measure(loaded, args, graphs=True, compiled=True)
    device = torch.cuda.get_device_name() if loaded.device.type == "cuda" else "CPU"
    print(f"\n# decode step, {args.shape} {str(dtype).replace('torch.', '')} on {device}, "
          f"{args.prompt_len}+{args.input_len} tokens per row, torch {torch.__version__}")  # fmt: skip
    print("| how | rows | step ms | engine step ms | kernels per step |\n|---|---|---|---|---|")
    for r in results:
        kernels = "-" if r["kernels"] is None else r["kernels"]
        print(f"| {r['how']} | {r['rows']} | {r['step_ms']:.3f} | {r['engine_ms']:.3f} | {kernels} |")


if __name__ == "__main__":
    main()
