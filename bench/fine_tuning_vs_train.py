"""A fine-tuning job on an idle server against `ptserve train`, same data and
settings (the sentiment example, from its hand-written prompt; --epochs,
learning rate 1e-3, seed 0), on the default model:

- time: the trainer's own seconds per epoch (the artifact's
  `seconds_per_epoch`: training passes and the epoch's dev scoring), job
  over `ptserve train`;
- the table: the largest difference between the two stored tables, and their
  dev figures (they are not bit-equal; docs/training.md says why);
- memory: peak RSS of `ptserve train` (its own process), of the server after
  a few generate requests, and of the same server once the job has run.

`ptserve train` runs first, alone; then the server starts and runs the job
with nothing else to do.

    python -m bench.fine_tuning_vs_train [--epochs 2] [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx

from bench.report import report
from bench.serve_process import start_server
from prompt_store.artifact import read_artifact
from ptcore.model_source import DEFAULT_MODEL_CACHE, resolve_model

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "sentiment"
LABELS = '{"positive": " positive", "negative": " negative"}'
MANUAL = "Review: {input} Sentiment:"


def peak_mib(pid: int) -> float:
    """A live process's peak resident memory (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc")


def train_alone(model: str, epochs: int, out: Path) -> float:
    """`ptserve train`, as the examples' README runs it; -> its peak RSS, MiB."""
    cmd = [sys.executable, "-m", "server.cli", "train", "--model", model, "--data", str(DATA / "train.jsonl"),
           "--dev", str(DATA / "dev.jsonl"), "--task-type", "classify", "--labels", LABELS, "--from-prompt", MANUAL,
           "--lr", "1e-3", "--epochs", str(epochs), "-o", str(out)]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the only child so far: KiB on Linux


def job_on_server(url: str, epochs: int):
    with httpx.Client(base_url=url, timeout=300) as client:
        ids = {}
        for split in ("train", "dev"):
            f = {"file": (f"{split}.jsonl", (DATA / f"{split}.jsonl").read_bytes())}
            r = client.post("/v1/files", files=f, data={"purpose": "fine-tune"})
            ids[split] = r.raise_for_status().json()["id"]
        base = client.get("/v1/models").json()["data"][0]["id"]
        body = {"model": base, "training_file": ids["train"], "validation_file": ids["dev"], "suffix": "review",
                "hyperparameters": {"n_epochs": epochs, "learning_rate_multiplier": 0.1}, "promote": "always",
                "labels": {"positive": " positive", "negative": " negative"}, "from_prompt": MANUAL}  # fmt: skip
        job_id = client.post("/v1/fine_tuning/jobs", json=body).raise_for_status().json()["id"]
        while (job := client.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] in ("queued", "running"):
            time.sleep(0.5)  # a remote job: nothing to wait on but its record
        if job["status"] != "succeeded":
            raise SystemExit(f"the job ended {job['status']}: {job['error']}")
        return read_artifact(client.get("/v1/tasks/review/artifact").raise_for_status().content)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--model-cache", default=os.environ.get("PTSERVE_MODEL_CACHE", DEFAULT_MODEL_CACHE))
    ap.add_argument("--write", action="store_true", help="write the table to bench/results/")
    args = ap.parse_args()
    model = resolve_model(None, args.model_cache)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "review.safetensors"
        train_peak = train_alone(model, args.epochs, out)
        alone = read_artifact(out.read_bytes())
        proc, url = start_server(model, str(Path(tmp) / "store"), "--preload", str(ROOT / "examples" / "prompts"))
        try:
            for text in ("The soup was cold.", "A wonderful stay.", "Meeting on 3 May."):
                httpx.post(f"{url}/v1/tasks/dates/generate", json={"input": text, "max_new_tokens": 8}, timeout=60)
            served_peak = peak_mib(proc.pid)
            job = job_on_server(url, args.epochs)
            job_peak = peak_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait()
    a, j = alone.meta["metrics"], job.meta["metrics"]
    diff = float((alone.embeddings - job.embeddings).abs().max())
    largest = float(alone.embeddings.abs().max())
    lines = [
        f"# a fine-tuning job against ptserve train, {date.today()}, {platform.node()} ({platform.machine()}, "
        f"{os.cpu_count()} cores)",
        f"default model, float32; the sentiment example from its manual prompt, {args.epochs} epochs, lr 1e-3, "
        "seed 0; the server idle during the job",
        "",
        "| measure | ptserve train | job on the server | ratio |",
        "|---|---|---|---|",
        f"| seconds per epoch | {a['seconds_per_epoch']:.1f} | {j['seconds_per_epoch']:.1f} | "
        f"{j['seconds_per_epoch'] / a['seconds_per_epoch']:.2f}x |",
        f"| dev loss (best epoch {a['best_epoch']} / {j['best_epoch']}) | {a['dev_loss']:.5f} | "
        f"{j['dev_loss']:.5f} | |",
        f"| dev accuracy | {a['dev_accuracy']:.4f} | {j['dev_accuracy']:.4f} | |",
        f"| peak RSS, MiB | {train_peak:.0f} (alone) | {served_peak:.0f} before the job, {job_peak:.0f} after | |",
        "",
        f"largest difference between the two tables: {diff:.2e} (their largest entry: {largest:.2f})",
        f"one server training its own jobs: {job_peak:.0f} MiB; a server beside a ptserve train process: "
        f"{served_peak:.0f} + {train_peak:.0f} = {served_peak + train_peak:.0f} MiB",
    ]
    report(lines, "fine-tuning-vs-train", args.write)


if __name__ == "__main__":
    main()
