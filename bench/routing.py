"""Round-robin vs task-affine routing: three replicas behind nginx, one Redis.

Starts redis-server, uploads --tasks generate tasks once, then for each mode
starts three fresh `ptserve serve` replicas (the command compose runs, on
loopback ports, each with PTSERVE_PROMPT_CACHE_SIZE and
PTSERVE_PREFIX_CACHE_SIZE below the task count) behind an nginx process that
runs deploy/nginx.conf as it ships, with two changes: its upstream list is the
three loopback ports and it listens on a free port. The round-robin mode drops
the one line `hash $ptserve_task consistent;`; nothing else differs.

Both modes send the same request sequence: Zipf-distributed tasks (exponent
--zipf, fixed --seed), sent by --clients concurrent clients; the first
--warmup requests fill the caches and are not counted. Reported per mode:
prompt- and prefix-cache hit rates (each replica's /v1/stats, summed over the
replicas, differences over the measured requests), throughput, p50/p99 latency.

    python -m bench.routing --write
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx
import torch

from bench.report import report
from bench.serve_process import free_port, start_server
from prompt_store.artifact import artifact_bytes, make_artifact
from ptcore.model import load_model
from ptcore.tiny_model import write_tiny_model

ROOT = Path(__file__).resolve().parent.parent

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
HASH_LINE = "        hash $ptserve_task consistent;\n"
TABLE_HEAD = [
    "| routing | prompt-cache hit rate | prefix-cache hit rate | req/s | p50 ms | p99 ms | errors |",
    "|---|---|---|---|---|---|---|",
]
WORDS = "the quick brown fox jumps over the lazy dog while json parses logging paths".split()


def nginx_conf(replicas: list[str], port: int, affine: bool) -> tuple[str, str]:
    """deploy/nginx.conf listening on `port`, and its ptserve-upstreams.conf for `replicas`."""
    conf = NGINX_CONF.read_text()
    assert HASH_LINE in conf and "listen 8000;" in conf, "deploy/nginx.conf changed; update bench/routing.py"
    conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{port};")
    if not affine:
        conf = conf.replace(HASH_LINE, "")
    upstreams = "".join(f"server {re.sub('^http://', '', url)};\n" for url in replicas)
    return conf, upstreams


def start_nginx(folder: Path, conf: str, upstreams: str) -> subprocess.Popen:
    folder.mkdir(parents=True)
    (folder / "nginx.conf").write_text(conf)
    (folder / "ptserve-upstreams.conf").write_text(upstreams)
    directives = f"daemon off; pid {folder}/nginx.pid; error_log {folder}/error.log;"
    return subprocess.Popen([shutil.which("nginx") or "/usr/sbin/nginx", "-p", str(folder), "-c",
                             str(folder / "nginx.conf"), "-g", directives])  # fmt: skip


def wait_for(url: str, proc: subprocess.Popen) -> None:
    for _ in range(100):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{url}: exited with {proc.returncode}")
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer")


def zipf_sequence(n_tasks: int, n: int, s: float, seed: int) -> list[tuple[int, str]]:
    """n requests: (task index, input text); task k (0-based) has weight 1/(k+1)^s."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** s for k in range(n_tasks)]
    tasks = rng.choices(range(n_tasks), weights=weights, k=n)
    return [(t, " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))) for t in tasks]


async def send(url: str, sequence, clients: int, max_new: int) -> list[tuple[int, float]]:
    """Send `sequence` in order with `clients` concurrent clients; -> (status, seconds) each."""
    results, queue = [], iter(sequence)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def loop():
            for task, text in queue:
                start = time.monotonic()
                body = {"input": text, "max_new_tokens": max_new}
                try:
                    status = (await client.post(f"/v1/tasks/t{task}/generate", json=body)).status_code
                except httpx.HTTPError:
                    status = 0
                results.append((status, time.monotonic() - start))

        await asyncio.gather(*(loop() for _ in range(clients)))
    return results


def cache_counts(replicas: list[str]) -> dict:
    """(hits, misses) of both caches, summed over the replicas."""
    total = {"prompt_cache": [0, 0], "prefix_cache": [0, 0]}
    for url in replicas:
        stats = httpx.get(f"{url}/v1/stats", timeout=30).json()
        for cache, counts in total.items():
            counts[0] += stats[cache]["hits"]
            counts[1] += stats[cache]["misses"]
    return total


def run_mode(affine: bool, model: str, store: str, tmp: Path, sequence, args) -> dict:
    procs, replicas = [], []
    try:
        for _ in range(args.replicas):
            proc, url = start_server(model, store)
            procs.append(proc)
            replicas.append(url)
        port = free_port()
        conf, upstreams = nginx_conf(replicas, port, affine)
        procs.append(start_nginx(tmp / ("affine" if affine else "round-robin"), conf, upstreams))
        url = f"http://127.0.0.1:{port}"
        wait_for(url, procs[-1])
        asyncio.run(send(url, sequence[: args.warmup], args.clients, args.max_new_tokens))
        before = cache_counts(replicas)
        start = time.monotonic()
        results = asyncio.run(send(url, sequence[args.warmup :], args.clients, args.max_new_tokens))
        wall = time.monotonic() - start
        after = cache_counts(replicas)
        per_replica = [httpx.get(f"{u}/v1/stats").json()["prompt_cache"]["size"] for u in replicas]
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait()
    counts = {cache: (after[cache][0] - before[cache][0], after[cache][1] - before[cache][1]) for cache in after}
    return {"affine": affine, "latencies": [d for status, d in results if status == 200],
            "errors": sum(status != 200 for status, _ in results), "requests": len(results), "wall": wall,
            "counts": counts, "cached": per_replica}  # fmt: skip


def row(label: str, runs: list[dict]) -> str:
    """One table row over `runs`: hit rates from summed counts, throughput from summed wall time."""
    ok = sorted(d for r in runs for d in r["latencies"])
    q = lambda p: 1000 * statistics.quantiles(ok, n=100, method="inclusive")[p - 1]  # noqa: E731
    rates = []
    for cache in ("prompt_cache", "prefix_cache"):
        hits, misses = (sum(r["counts"][cache][i] for r in runs) for i in (0, 1))
        rates.append(f"{hits / (hits + misses):.1%} ({hits}/{hits + misses})")
    rps = sum(r["requests"] for r in runs) / sum(r["wall"] for r in runs)
    errors = sum(r["errors"] for r in runs)
    return f"| {label} | {rates[0]} | {rates[1]} | {rps:.1f} | {q(50):.0f} | {q(99):.0f} | {errors} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=300)
    ap.add_argument("--cache-size", type=int, default=64, help="PTSERVE_PROMPT_CACHE_SIZE and _PREFIX_ per replica")
    ap.add_argument("--requests", type=int, default=3000, help="measured requests per mode")
    ap.add_argument("--warmup", type=int, default=600)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per replica (OMP_NUM_THREADS): the replicas share this machine's cores",
    )
    ap.add_argument("--rounds", type=int, default=2, help="each round runs both modes; the order alternates (ABBA)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    os.environ["PTSERVE_PROMPT_CACHE_SIZE"] = os.environ["PTSERVE_PREFIX_CACHE_SIZE"] = str(args.cache_size)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # more threads than cores: OpenMP's spinning stalls them all
    sequence = zipf_sequence(args.tasks, args.warmup + args.requests, args.zipf, args.seed)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model = str(write_tiny_model(tmp / "tiny", "gpt2"))
        redis_port = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--dir", name], stdout=subprocess.DEVNULL)  # fmt: skip
        store = f"redis://127.0.0.1:{redis_port}/0"
        try:
            loaded = load_model(model, device="cpu", dtype="float32")
            weight = loaded.model.get_input_embeddings().weight
            gen = torch.Generator().manual_seed(args.seed)
            proc, url = start_server(model, store)
            try:
                with httpx.Client(base_url=url, timeout=60) as client:
                    for t in range(args.tasks):
                        rows = torch.randn(8, weight.shape[1], generator=gen) * float(weight.std())
                        artifact = make_artifact(rows, template="[P:6] Answer: {input}[P:2]", task_type="generate",
                                                 base_model=loaded.info)  # fmt: skip
                        client.put(f"/v1/tasks/t{t}", content=artifact_bytes(artifact)).raise_for_status()
            finally:
                proc.terminate()
                proc.wait()
            order = [mode for r in range(args.rounds) for mode in ((False, True) if r % 2 == 0 else (True, False))]
            runs = [run_mode(affine, model, store, tmp / str(i), sequence, args) for i, affine in enumerate(order)]
        finally:
            redis.terminate()
            redis.wait()

    distinct = len({t for t, _ in sequence[args.warmup :]})
    lines = [
        f"# routing: round robin vs task-affine, {date.today()}, {platform.node()} "
        f"({platform.machine()}, CPU, {os.cpu_count()} cores)",
        f"model=tiny gpt2 (random weights, `ptcore/tiny_model.py`) replicas={args.replicas} store=redis "
        f"tasks={args.tasks} (generate, template '[P:6] Answer: {{input}}[P:2]') "
        f"prompt/prefix cache={args.cache_size} per replica; zipf s={args.zipf:g} seed={args.seed}: "
        f"{args.requests} measured requests over {distinct} distinct tasks after {args.warmup} warm-up; "
        f"clients={args.clients} max_new_tokens={args.max_new_tokens} threads/replica={args.threads}; "
        f"each run on freshly started replicas; {args.rounds} rounds, order alternating (ABBA...)",
        "",
        *TABLE_HEAD,
    ]
    name = {False: "round robin", True: "affine (`hash $ptserve_task consistent`)"}
    lines += [row(f"{name[affine]}, all {args.rounds} runs", [r for r in runs if r["affine"] == affine])
              for affine in (False, True)]  # fmt: skip
    lines += ["", "each run, in the order they ran:", "", *TABLE_HEAD]
    lines += [row(f"{i + 1}. {name[r['affine']]}", [r]) for i, r in enumerate(runs)]
    lines += ["", "prompts cached per replica at the end of each run: " + "; ".join(str(r["cached"]) for r in runs)]
    report(lines, "routing", args.write)
    sys.exit(1 if any(r["errors"] for r in runs) else 0)


if __name__ == "__main__":
    main()
