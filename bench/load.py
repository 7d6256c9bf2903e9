"""Load run against a real `ptserve serve` on loopback.

--clients concurrent clients loop for --seconds (a bounded loop that stops by
itself), each sending generate or classify requests to one of --tasks tasks
(half generate, half classify). Reports status codes (5xx must be zero),
latency p50/p99 per route, throughput, and the server's resident memory
before and after.

    python -m bench.load --clients 64 --seconds 60 --write
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import platform
import random
import statistics
import sys
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

WORDS = "the quick brown fox jumps over the lazy dog while json parses logging paths".split()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def client_loop(client, tasks, until, max_new, results, rng):
    while time.monotonic() < until:
        task, kind = rng.choice(tasks)
        body = {"input": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))}
        if kind == "generate":
            body["max_new_tokens"] = max_new
        start = time.monotonic()
        try:
            r = await client.post(f"/v1/tasks/{task}/{kind}", json=body)
            status, tokens = r.status_code, len(r.json().get("token_ids", [])) if r.status_code == 200 else 0
        except httpx.HTTPError as e:
            status, tokens = f"error:{type(e).__name__}", 0
        results.append((kind, status, time.monotonic() - start, tokens))


async def run(url, tasks, clients, seconds, max_new):
    results = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(client_loop(client, tasks, until, max_new, results, random.Random(i)) for i in range(clients))
        )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: a tiny random GPT-2)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--server-log", help="keep the server's output in this file")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(write_tiny_model(Path(tmp) / "tiny", "gpt2"))
        loaded = load_model(model, device="cpu", dtype="float32")
        log = open(args.server_log, "w") if args.server_log else None
        proc, url = start_server(model, str(Path(tmp) / "store"), log=log)
        try:
            tasks = []
            weight = loaded.model.get_input_embeddings().weight
            for t in range(args.tasks):
                kind = "generate" if t % 2 == 0 else "classify"
                labels = {"yes": " yes", "no": " no", "maybe": " maybe"} if kind == "classify" else None
                rows = torch.randn(6, weight.shape[1]) * float(weight.std())
                artifact = make_artifact(rows, template="[P:3]{input}[P:3]", task_type=kind, labels=labels,
                                         base_model=loaded.info)  # fmt: skip
                httpx.put(f"{url}/v1/tasks/t{t}", content=artifact_bytes(artifact), timeout=60).raise_for_status()
                tasks.append((f"t{t}", kind))
            asyncio.run(run(url, tasks, 8, 2, args.max_new_tokens))  # warm-up
            before = rss_mb(proc.pid)
            start = time.monotonic()
            results = asyncio.run(run(url, tasks, args.clients, args.seconds, args.max_new_tokens))
            wall = time.monotonic() - start
            after = rss_mb(proc.pid)
            stats = httpx.get(f"{url}/v1/stats").json()
        finally:
            proc.terminate()
            proc.wait()

    codes = collections.Counter(str(s) for _, s, _, _ in results)
    server_errors = sum(n for c, n in codes.items() if c.startswith("5") or c.startswith("error"))
    q = lambda xs, p: statistics.quantiles(xs, n=100, method="inclusive")[p - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    lines = [
        f"# load run, {date.today()}, {platform.node()} ({platform.machine()}, CPU, {os.cpu_count()} cores)",
        f"model={'tiny gpt2 (random)' if not args.model else args.model} clients={args.clients} "
        f"seconds={args.seconds:g} tasks={args.tasks} (half generate, half classify) "
        f"max_new_tokens={args.max_new_tokens} engine={stats['engine']}",
        "",
        f"requests: {len(results)} in {wall:.1f} s = {len(results) / wall:.1f} req/s; "
        f"generated tokens/s: {sum(t for *_, t in results) / wall:.1f}",
        f"status codes: {dict(sorted(codes.items()))}; 5xx or transport errors: {server_errors}",
        "",
        "| route | requests | p50 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    for kind in ("generate", "classify"):
        lat = [d for k, s, d, _ in results if k == kind and s == 200]
        if lat:
            lines.append(f"| {kind} | {len(lat)} | {1000 * q(lat, 50):.0f} | {1000 * q(lat, 99):.0f} |")
    lines += [
        "",
        f"server resident memory: {before:.0f} MB before, {after:.0f} MB after",
        f"forward batches: {stats['batches']['batches']}, largest {stats['batches']['max_batch_size_seen']} rows",
    ]
    report(lines, "load", args.write)
    sys.exit(1 if server_errors else 0)


if __name__ == "__main__":
    main()
