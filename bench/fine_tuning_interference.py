"""What a fine-tuning job costs the requests it shares the model with.

Starts `ptserve serve` on the default model (a real server on a loopback port),
uploads the example generate tasks (dates, language) and the sentiment
training file. Then, for each --clients count, runs that many closed-loop
clients (each streams one generate request after another, --max-new-tokens
tokens past EOS, over the example tasks) for --seconds with no job, then
(after 3 s in which the job's first passes, run while the server was idle,
end) for --seconds while a fine-tuning job trains (the sentiment data, from
its manual prompt); --rounds times, alternating. It reports, side by side,
over all phases of a kind: generated tokens/s, time per output token
(p50/p99: (last token - first token) / (tokens - 1) of each answer), and the
job's progress (training passes per second, and the share of model time they
took, from /v1/stats).

    python -m bench.fine_tuning_interference                  # 16 and 2 clients, 2 x 30 s each
    python -m bench.fine_tuning_interference --write          # also writes bench/results/
    PTSERVE_TRAIN_SHARE=0.3 python -m bench.fine_tuning_interference --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx

from bench.report import report
from bench.serve_process import start_server
from ptcore.model_source import DEFAULT_MODEL_CACHE, resolve_model

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["dates", "language"]


def inputs() -> list[tuple[str, str]]:
    out = []
    for task in TASKS:
        lines = (ROOT / "examples" / task / "test.jsonl").read_text().splitlines()
        out += [(task, json.loads(line)["input"]) for line in lines]
    return out


async def client_loop(client: httpx.AsyncClient, work, stop_at: float, n: int, seen: list) -> None:
    i = 0
    while time.monotonic() < stop_at:
        task, text = work[i % len(work)]
        i += 1
        body = {"input": text, "max_new_tokens": n, "ignore_eos": True, "stream": True}
        first = last = None
        tokens = 0
        async with client.stream("POST", f"/v1/tasks/{task}/generate", json=body) as r:
            if r.status_code != 200:
                raise SystemExit(f"generate answered {r.status_code}: {await r.aread()}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                now = time.monotonic()
                first = first or now
                last = now
                if event.get("done"):
                    tokens = len(event["token_ids"])
        if tokens > 1 and last > first:
            seen.append((tokens, (last - first) / (tokens - 1)))


async def load(url: str, clients: int, seconds: float, n: int) -> dict:
    """One phase: `clients` closed-loop clients for `seconds`; -> what it measured (see summary)."""
    work = inputs()
    seen: list = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        before = (await client.get("/v1/stats")).json()["fine_tuning"]
        start = time.monotonic()
        await asyncio.gather(*(client_loop(client, work[k::clients] or work, start + seconds, n, seen)
                               for k in range(clients)))  # fmt: skip
        wall = time.monotonic() - start
        after = (await client.get("/v1/stats")).json()["fine_tuning"]
    delta = {k: after[k] - before[k] for k in ("training_passes", "training_seconds", "inference_seconds")}
    return {"seen": seen, "wall": wall, **delta}


def summary(phases: list[dict]) -> dict:
    """Phases of one kind, pooled: tokens/s over their time, TPOT percentiles over all their answers."""
    seen = [x for p in phases for x in p["seen"]]
    wall = sum(p["wall"] for p in phases)
    tpot = sorted(t for _, t in seen)
    q = lambda p: statistics.quantiles(tpot, n=100, method="inclusive")[p - 1]  # noqa: E731
    trained = sum(p["training_seconds"] for p in phases)
    inferred = sum(p["inference_seconds"] for p in phases)
    return {"tokens_per_s": sum(k for k, _ in seen) / wall, "tpot_p50_ms": 1000 * q(50), "tpot_p99_ms": 1000 * q(99),
            "answers": len(seen), "passes_per_s": sum(p["training_passes"] for p in phases) / wall,
            "train_share": trained / (trained + inferred) if trained + inferred else 0.0}  # fmt: skip


def start_job(url: str, epochs: int) -> str:
    files = {}
    for split in ("train", "dev"):
        data = (ROOT / "examples" / "sentiment" / f"{split}.jsonl").read_bytes()
        r = httpx.post(f"{url}/v1/files", files={"file": (f"{split}.jsonl", data)}, data={"purpose": "fine-tune"})
        files[split] = r.raise_for_status().json()["id"]
    base = next(m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"] if m.get("ptserve_base_model"))
    body = {"model": base, "training_file": files["train"], "validation_file": files["dev"], "suffix": "review",
            "hyperparameters": {"n_epochs": epochs, "learning_rate_multiplier": 0.1},
            "labels": {"positive": " positive", "negative": " negative"},
            "from_prompt": "Review: {input} Sentiment:"}  # fmt: skip
    job = httpx.post(f"{url}/v1/fine_tuning/jobs", json=body, timeout=60).raise_for_status().json()
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/v1/fine_tuning/jobs/{job['id']}").json()["status"] != "running":
        if time.monotonic() > deadline:
            raise SystemExit("the job did not start")
        time.sleep(0.2)
    return job["id"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[16, 2])
    ap.add_argument("--seconds", type=float, default=30, help="length of each measured phase")
    ap.add_argument("--rounds", type=int, default=2, help="phases of each kind per client count, alternating")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--model-cache", default=os.environ.get("PTSERVE_MODEL_CACHE", DEFAULT_MODEL_CACHE))
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    model = resolve_model(None, args.model_cache)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(model, str(Path(tmp) / "store"), "--preload", str(ROOT / "examples" / "prompts"))
        try:
            asyncio.run(load(url, 2, 3, args.max_new_tokens))  # warm-up
            for clients in args.clients:
                alone, shared = [], []
                for _ in range(args.rounds):  # alternating: a drift of the machine's speed hits both kinds alike
                    alone.append(asyncio.run(load(url, clients, args.seconds, args.max_new_tokens)))
                    job = start_job(url, epochs=1000)
                    # the job's first passes ran on an idle server (whole batches): let them end before measuring
                    asyncio.run(load(url, clients, 3, args.max_new_tokens))
                    shared.append(asyncio.run(load(url, clients, args.seconds, args.max_new_tokens)))
                    httpx.post(f"{url}/v1/fine_tuning/jobs/{job}/cancel").raise_for_status()
                    while httpx.get(f"{url}/v1/fine_tuning/jobs/{job}").json()["status"] != "cancelled":
                        time.sleep(0.2)
                rows += [(clients, "no job", summary(alone)), (clients, "a job training", summary(shared))]
                print(f"{clients} clients: {rows[-2][2]['tokens_per_s']:.1f} -> {rows[-1][2]['tokens_per_s']:.1f} "
                      "tokens/s", flush=True)  # fmt: skip
        finally:
            proc.terminate()
            proc.wait()
    share = os.environ.get("PTSERVE_TRAIN_SHARE", "(default)")
    micro = os.environ.get("PTSERVE_TRAIN_MICRO_BATCH_SIZE", "(default)")
    lines = [
        f"# fine-tuning interference, {date.today()}, {platform.node()} ({platform.machine()}, {os.cpu_count()} cores)",
        f"default model float32; PTSERVE_TRAIN_SHARE={share}, PTSERVE_TRAIN_MICRO_BATCH_SIZE={micro}; "
        f"{args.rounds} x {args.seconds:g} s per kind of phase, alternating;"
        f" streamed generate requests of {args.max_new_tokens} tokens over {TASKS}; "
        "the job: the sentiment example",
        "",
        "| clients | phase | tokens/s | TPOT p50 ms | TPOT p99 ms | answers | training passes/s | training share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for clients, phase, r in rows:
        cells = [f"{r['tokens_per_s']:.1f}", f"{r['tpot_p50_ms']:.1f}", f"{r['tpot_p99_ms']:.1f}", str(r["answers"]),
                 f"{r['passes_per_s']:.2f}", f"{r['train_share']:.2f}"]  # fmt: skip
        lines.append(f"| {clients} | {phase} | {' | '.join(cells)} |")
    lines.append("")
    for clients in args.clients:
        a, b = (r for c, _, r in rows if c == clients)
        lines.append(f"{clients} clients: throughput {b['tokens_per_s'] / a['tokens_per_s']:.2f}x of the job-free run, "
                     f"TPOT p99 {b['tpot_p99_ms'] / a['tpot_p99_ms']:.2f}x (targets: >= 0.70x, <= 2x)")  # fmt: skip
    report(lines, "fine-tuning-interference", args.write)


if __name__ == "__main__":
    main()
