"""What the Redis store costs per request: the identity lookup PromptCache.get
makes before every request, old path (one HMGET each, `identity_max_lag=0`)
against new (from memory while the invalidation channel is confirmed), side by
side in one run against a real local redis-server. Reports median and p99 µs
per lookup and Redis commands per lookup (INFO commandstats: the same on any
machine). PromptCache.get adds a lock and a dict lookup to either path.

    python -m bench.store_cost --lookups 20000 [--out bench/results/...md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import redis

from prompt_store.redis_store import RedisStore
from tests.helpers import filled_artifact, start_redis


def commands(raw) -> dict[str, int]:
    return {k.removeprefix("cmdstat_"): v["calls"] for k, v in raw.info("commandstats").items()}


def measure(store, raw, n: int) -> tuple[list[float], dict[str, int]]:
    """n lookups: µs each, and the commands Redis ran meanwhile (less the INFO that counts them)."""
    before = commands(raw)
    times = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        store.identity("bench")
        times.append((time.perf_counter_ns() - t0) / 1000)
    after = commands(raw)
    ran = {k: after[k] - before.get(k, 0) for k in after}
    ran["info"] -= 1
    return times, {k: v for k, v in ran.items() if v}


def p99(xs: list[float]) -> float:
    return sorted(xs)[int(0.99 * (len(xs) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lookups", type=int, default=20000, help="per path, split over --rounds")
    ap.add_argument("--rounds", type=int, default=10, help="old and new alternate, so drift hits both")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    proc, url = start_redis()
    try:
        writer = RedisStore(url)
        old, new = RedisStore(url, identity_max_lag=0), RedisStore(url)
        raw = redis.Redis.from_url(url)
        writer.put("bench", filled_artifact(1.0))
        deadline = time.monotonic() + 5
        while not new._watcher.lookup("bench")[0]:  # until answered from memory
            new.identity("bench")
            assert time.monotonic() < deadline, "the invalidation channel was never confirmed"
            time.sleep(0.01)
        per_round = args.lookups // args.rounds
        results = {"old (HMGET per lookup)": ([], {}), "new (from memory)": ([], {})}
        t_start = time.monotonic()
        for _ in range(args.rounds):
            for (_name, (times, ran)), store in zip(results.items(), (old, new)):
                t, r = measure(store, raw, per_round)
                times.extend(t)
                for k, v in r.items():
                    ran[k] = ran.get(k, 0) + v
        wall = time.monotonic() - t_start
        lines = [
            f"{per_round * args.rounds} lookups per path, {args.rounds} alternating rounds, {wall:.1f} s in all; "
            f"redis-server {raw.info('server')['redis_version']} on loopback, redis-py {redis.__version__}",
            "",
            "| path | median µs | p99 µs | HMGETs per lookup | all commands Redis ran meanwhile |",
            "|---|---:|---:|---:|---|",
        ]
        for name, (times, ran) in results.items():
            per = ran.get("hmget", 0) / len(times)
            seen = ", ".join(f"{k} {v}" for k, v in sorted(ran.items())) or "none"
            lines.append(f"| {name} | {statistics.median(times):.1f} | {p99(times):.1f} | {per:.4f} | {seen} |")
        lines += [
            "",
            "Commands that are not per lookup: `hello` opens a connection; `ping` is the",
            "new store's channel heartbeat (one every max_lag / 5 = 0.1 s per replica, whatever",
            "the load; it lands in whichever block is running).",
        ]
        text = "\n".join(lines)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        for s in (writer, old, new):
            s.close()
    finally:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    main()
