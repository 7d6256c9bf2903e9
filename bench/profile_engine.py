"""Where an engine's time goes: the prefill of one full batch (admit) and a few
decode steps (step) of bench/engine.py's workload, each timed on its own and
then profiled, with the top operators by device time and by host time.

    python -m bench.profile_engine --shape llama-1b --dtype bfloat16 --rows 64   # a GPU
    python -m bench.profile_engine --shape tiny --rows 4                         # CPU
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.engine import SHAPES, admit, build, make_batcher, make_requests, sync


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=20)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    loaded = build(args.shape, args.device, dtype)
    args.max_running = args.rows
    batch = make_batcher(loaded, args, graphs=True)
    requests = make_requests(loaded, args.tasks, args.rows, args.prompt_len, args.input_len, args.new_tokens)

    def admit_now(fresh_prefixes: bool):
        admit(batch, requests, fresh_prefixes)
        sync(loaded)

    def steps(n: int = 5):
        for _ in range(n):
            batch.decode()
        sync(loaded)

    timed = [("admit, prefixes computed", lambda: admit_now(True)),
             ("admit, prefixes cached", lambda: admit_now(False)), ("5 decode steps", steps)]  # fmt: skip
    for name, fn in timed:
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        print(f"{name}: {1000 * (time.perf_counter() - start):.1f} ms", flush=True)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if loaded.device.type == "cuda" else [])
    device_key = "cuda_time_total" if loaded.device.type == "cuda" else "cpu_time_total"
    for name, fn in (("admit, prefixes computed", lambda: admit_now(True)), ("5 decode steps", steps)):
        with profile(activities=activities) as prof:
            fn()
        table = prof.key_averages()
        print(f"\n## {name}: by device time\n" + table.table(sort_by=device_key, row_limit=args.top), flush=True)
        print(f"\n## {name}: by host time (self)\n" + table.table(sort_by="self_cpu_time_total", row_limit=args.top),
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
