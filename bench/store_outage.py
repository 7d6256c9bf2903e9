"""What a request waits for while Redis does not answer.

Starts a redis-server of its own and `ptserve serve` on a tiny random model
(ptserve tiny-model) with that Redis as the store (default socket timeout,
5 s), uploads two tasks and generates once with one of them (now cached).
Then SIGSTOPs redis-server and times, one after another: a generate of the
cached task (the first waits out the socket timeout), --repeats more of it,
--repeats generates of the other task (503), and --repeats GET /ready (503).
Then SIGCONTs redis-server and times how long until /ready answers 200.

    python -m bench.store_outage
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.serve_process import start_server

ROOT = Path(__file__).resolve().parent.parent
BODY = {"input": "x", "max_new_tokens": 2}


def timed(call) -> tuple[float, int]:
    started = time.perf_counter()
    status = call().status_code
    return (time.perf_counter() - started) * 1000, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    from tests.helpers import start_redis  # the tests' redis-server starter (run from the repository root)

    redis_proc, url = start_redis()
    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "tiny")
        subprocess.run([sys.executable, "-m", "server.cli", "tiny-model", model], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        for task in ("cached", "cold"):
            subprocess.run([sys.executable, "-m", "server.cli", "make-artifact", "--model", model, "--template",
                            "[P:2]{input}", "-o", str(Path(tmp) / f"{task}.safetensors")], cwd=ROOT, check=True,
                           capture_output=True)  # fmt: skip
        proc, base = start_server(model, url)
        try:
            with httpx.Client(base_url=base, timeout=60) as c:
                for task in ("cached", "cold"):
                    c.put(f"/v1/tasks/{task}", content=(Path(tmp) / f"{task}.safetensors").read_bytes())
                assert c.post("/v1/tasks/cached/generate", json=BODY).status_code == 200
                os.kill(redis_proc.pid, signal.SIGSTOP)
                first = timed(lambda: c.post("/v1/tasks/cached/generate", json=BODY))
                rows = {"cached generate": [], "other task's generate": [], "GET /ready": []}
                for _ in range(args.repeats):
                    rows["cached generate"].append(timed(lambda: c.post("/v1/tasks/cached/generate", json=BODY)))
                    rows["other task's generate"].append(timed(lambda: c.post("/v1/tasks/cold/generate", json=BODY)))
                    rows["GET /ready"].append(timed(lambda: c.get("/ready")))
                os.kill(redis_proc.pid, signal.SIGCONT)
                resumed = time.perf_counter()
                while c.get("/ready").status_code != 200:
                    time.sleep(0.01)
                back = (time.perf_counter() - resumed) * 1000
        finally:
            proc.terminate()
            proc.wait()
            os.kill(redis_proc.pid, signal.SIGCONT)
            redis_proc.kill()
    print(f"Redis stopped; the first cached generate: {first[0]:.0f} ms (status {first[1]})")
    print("| call, after that | status | median ms | max ms |")
    print("|---|---|---|---|")
    for name, results in rows.items():
        ms = [m for m, _ in results]
        print(f"| {name} | {sorted({s for _, s in results})} | {statistics.median(ms):.1f} | {max(ms):.1f} |")
    print(f"Redis continued; /ready answered 200 after {back:.0f} ms")


if __name__ == "__main__":
    main()
