"""Concurrent vs one-at-a-time: the same requests sent to a real `ptserve serve`.

Starts the server as a subprocess on a free loopback port (a tiny random-weight
model unless --model is given), uploads --tasks prompts, then sends --requests
generate requests spread over the tasks, alternately one at a time and all at
once, --repeats times each. Prints the median wall time of each mode, their
ratio and the batch sizes the server recorded.

    python -m bench.concurrency                      # tiny GPT-2 shape, CPU
    python -m bench.concurrency --write              # also writes bench/results/
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx
import torch

from bench.report import report
from bench.serve_process import start_server
from prompt_store.artifact import artifact_bytes, make_artifact
from ptcore.model import load_model
from ptcore.tiny_model import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def bodies(n: int, tasks: int, max_new_tokens: int) -> list[tuple[str, dict]]:
    words = "the quick brown fox jumps over the lazy dog while json parses logging paths".split()
    return [
        (f"task{i % tasks}", {"input": " ".join(words[: 1 + i % len(words)]), "max_new_tokens": max_new_tokens})
        for i in range(n)
    ]


async def send_all(url: str, requests: list[tuple[str, dict]], concurrent: bool) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        if concurrent:
            responses = await asyncio.gather(*(client.post(f"/v1/tasks/{t}/generate", json=b) for t, b in requests))
        else:
            responses = [await client.post(f"/v1/tasks/{t}/generate", json=b) for t, b in requests]
        elapsed = time.perf_counter() - start
    bad = [r.text for r in responses if r.status_code != 200]
    if bad:
        raise SystemExit(f"{len(bad)} requests failed, e.g. {bad[0]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory or id (default: a tiny random GPT-2 written to a temp dir)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=10, help="pseudo tokens per task ([P:n/2]{input}[P:n/2])")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="append the table to bench/results/")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(write_tiny_model(Path(tmp) / "tiny", "gpt2"))
        loaded = load_model(model, device="cpu", dtype="float32")
        proc, url = start_server(model, str(Path(tmp) / "store"), "--max-batch-size", str(args.max_batch_size),
                                 "--max-wait-ms", str(args.max_wait_ms))  # fmt: skip
        try:
            half = max(1, args.prompt_tokens // 2)
            weight = loaded.model.get_input_embeddings().weight
            for t in range(args.tasks):
                rows = torch.randn(2 * half, weight.shape[1]) * float(weight.std())
                artifact = make_artifact(rows, template=f"[P:{half}]{{input}}[P:{half}]", task_type="generate",
                                         base_model=loaded.info)  # fmt: skip
                httpx.put(f"{url}/v1/tasks/task{t}", content=artifact_bytes(artifact), timeout=60).raise_for_status()
            requests = bodies(args.requests, args.tasks, args.max_new_tokens)
            asyncio.run(send_all(url, requests[:4], concurrent=True))  # warm-up
            times: dict[str, list[float]] = {"one at a time": [], "concurrent": []}
            before = httpx.get(f"{url}/v1/stats").json()["batches"]["batches"]
            for _ in range(args.repeats):
                times["one at a time"].append(asyncio.run(send_all(url, requests, concurrent=False)))
                times["concurrent"].append(asyncio.run(send_all(url, requests, concurrent=True)))
            stats = httpx.get(f"{url}/v1/stats").json()["batches"]
        finally:
            proc.terminate()
            proc.wait()

    seq = statistics.median(times["one at a time"])
    con = statistics.median(times["concurrent"])
    concurrent_sizes = [b["size"] for b in stats["recent"][-(stats["batches"] - before) :] if b["size"] > 1]
    cpu = platform.processor() or platform.machine()
    lines = [
        f"# concurrency benchmark, {date.today()}, {platform.node()} ({cpu}, CPU, {os.cpu_count()} cores)",
        f"model={'tiny gpt2 (random)' if not args.model else args.model} requests={args.requests} tasks={args.tasks} "
        f"pseudo_tokens={2 * half} max_new_tokens={args.max_new_tokens} repeats={args.repeats}",
        "",
        "| mode | median wall s | all runs s | requests/s |",
        "|---|---|---|---|",
        *(
            f"| {mode} | {statistics.median(ts):.3f} | {' '.join(f'{t:.3f}' for t in ts)} | "
            f"{args.requests / statistics.median(ts):.1f} |"
            for mode, ts in times.items()
        ),
        "",
        f"concurrent speed-up (one-at-a-time wall / concurrent wall): {seq / con:.2f}x",
        f"batch sizes > 1 seen during the runs: {sorted(set(concurrent_sizes))}",
    ]
    report(lines, "concurrency", args.write)


if __name__ == "__main__":
    main()
