"""What a flood of long inputs costs ordinary requests.

Starts `ptserve serve` on the default model (a real server on a loopback port,
the example prompts preloaded). One client sends ordinary requests one at a
time (`{"input": "hello", "max_new_tokens": 1}` to the `language` task); for
the flood phases, --flooders more clients loop on `{"input": "😀" * 65536}`,
which the server tokenizes (196,608 tokens) and then refuses with 422. Phases
of --seconds alternate, alone then flood, --rounds times; the ordinary
client's latency (p50, p95) is reported over all phases of a kind, side by
side, and the flood's refusals per second.

    python -m bench.long_input_flood                 # 3 rounds of 2 x 15 s
    python -m bench.long_input_flood --write         # also writes bench/results/
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.report import report
from bench.serve_process import start_server
from ptcore.model_source import DEFAULT_MODEL_CACHE, resolve_model

ROOT = Path(__file__).resolve().parent.parent
LONG = "😀" * 65536  # at the character bound of the default 4096-token input limit: tokenized, then refused
# encoded once: the flood's cost to the machine is the server's work, not the client's JSON encoding
LONG_BODY = json.dumps({"input": LONG, "max_new_tokens": 1}).encode()


def ordinary(url: str, stop_at: float) -> list[float]:
    """Latencies (ms) of one ordinary request after another until `stop_at`."""
    out = []
    with httpx.Client(base_url=url, timeout=60) as c:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            r = c.post("/v1/tasks/language/generate", json={"input": "hello", "max_new_tokens": 1})
            out.append((time.perf_counter() - started) * 1000)
            assert r.status_code == 200, r.text
    return out


def flood(url: str, stop: threading.Event, refused: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        while not stop.is_set():
            r = c.post("/v1/tasks/language/generate", content=LONG_BODY, headers={"content-type": "application/json"})
            assert r.status_code == 422, r.text
            refused.append(1)


def phase(url: str, seconds: float, flooders: int) -> tuple[list[float], float]:
    """-> (the ordinary client's latencies, the flood's refusals per second)."""
    stop, refused = threading.Event(), []
    threads = [threading.Thread(target=flood, args=(url, stop, refused)) for _ in range(flooders)]
    for t in threads:
        t.start()
    if flooders:  # the flood is under way before the ordinary client starts
        while not refused:
            time.sleep(0.01)
    started = time.monotonic()
    latencies = ordinary(url, started + seconds)
    stop.set()
    for t in threads:
        t.join()
    return latencies, len(refused) / (time.monotonic() - started)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def row(i: int, name: str, latencies: list[float]) -> str:
    return f"| {i + 1} | {name} | {len(latencies)} | {pct(latencies, 50):.1f} | {pct(latencies, 95):.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flooders", type=int, default=1)
    parser.add_argument("--model-cache", default=DEFAULT_MODEL_CACHE)
    parser.add_argument("--write", action="store_true", help="write the table to bench/results/")
    args = parser.parse_args()
    model = resolve_model(None, args.model_cache)
    alone, flooded, rates, phases = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(model, str(Path(tmp) / "store"), "--preload", str(ROOT / "examples" / "prompts"))
        try:
            ordinary(url, time.monotonic() + 2)  # warm-up
            for i in range(args.rounds):
                latencies = phase(url, args.seconds, 0)[0]
                alone += latencies
                phases.append(row(i, "alone", latencies))
                latencies, rate = phase(url, args.seconds, args.flooders)
                flooded += latencies
                rates.append(rate)
                phases.append(row(i, "flood", latencies))
        finally:
            proc.terminate()
            proc.wait()
    p50, p95 = (pct(alone, 50), pct(flooded, 50)), (pct(alone, 95), pct(flooded, 95))  # (alone, flood) each
    lines = [
        "# Ordinary requests beside a flood of long inputs",
        "",
        f"`python -m bench.long_input_flood --seconds {args.seconds:g} --rounds {args.rounds} "
        f"--flooders {args.flooders}` on {platform.machine()}, {platform.node()}; the default model, float32, CPU.",
        "",
        "| ordinary client | requests | p50 ms | p95 ms |",
        "|---|---|---|---|",
        f"| alone | {len(alone)} | {p50[0]:.1f} | {p95[0]:.1f} |",
        f"| beside the flood ({statistics.mean(rates):.1f} long inputs refused per s) | {len(flooded)} | "
        f"{p50[1]:.1f} | {p95[1]:.1f} |",
        "",
        f"Flood / alone: p50 {p50[1] / p50[0]:.2f}×, p95 {p95[1] / p95[0]:.2f}×.",
        "",
        "Each phase:",
        "",
        "| round | phase | requests | p50 ms | p95 ms |",
        "|---|---|---|---|---|",
        *phases,
    ]
    report(lines, "long-input-flood", args.write)


if __name__ == "__main__":
    main()
