"""The three example tasks trained through the fine-tuning API, scored on their
held-out test splits beside the shipped prompts (examples/prompts/).

Starts `ptserve serve` on the default model (a real server on a loopback port,
an empty disk store), uploads each task's train and dev splits with
POST /v1/files, and creates one job per task with the settings of the
`ptserve train` command in the task's README (from its hand-written prompt,
the lstm encoder, the same epochs and learning rate). The jobs run one after
another on the server. Each stored version is then downloaded
(GET /v1/tasks/{id}/artifact) and scored on test.jsonl by the same code as
examples/README.md's table (bench/example_tasks.py: the serving path,
float32, greedy). Nothing is tuned on the test splits.

    python -m bench.fine_tuning_quality [--write] [--tasks sentiment dates]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx

from bench.example_tasks import EXAMPLES, TASKS, rows, score
from bench.report import report
from bench.serve_process import start_server
from prompt_store.artifact import read_artifact
from ptcore.model import load_model
from ptcore.model_source import DEFAULT_MODEL_CACHE, resolve_model

# each task's README command, as a job body (learning_rate_multiplier x the default lr 1e-2)
JOBS = {
    "sentiment": {"hyperparameters": {"n_epochs": 3, "learning_rate_multiplier": 0.1},
                  "labels": {"positive": " positive", "negative": " negative"},
                  "from_prompt": "Review: {input} Sentiment:"},
    "language": {"hyperparameters": {"n_epochs": 10, "learning_rate_multiplier": 0.1}, "task_type": "generate",
                 "from_prompt": "The official language of {input} is"},
    "dates": {"hyperparameters": {"n_epochs": 5}, "task_type": "generate", "from_prompt": "Sentence: {input} Date:"},
}  # fmt: skip
SHIPPED = {"sentiment": 0.988, "language": 0.642, "dates": 0.983}  # examples/README.md's P-tuned column
METRIC = {"sentiment": "accuracy", "language": "P@1", "dates": "exact match"}


def upload(client: httpx.Client, path: Path) -> str:
    r = client.post("/v1/files", files={"file": (path.name, path.read_bytes())}, data={"purpose": "fine-tune"})
    return r.raise_for_status().json()["id"]


def train(client: httpx.Client, tasks: list[str]) -> dict[str, dict]:
    """Create every task's job, then wait for each; -> task -> finished job."""
    base = next(m["id"] for m in client.get("/v1/models").json()["data"] if m.get("ptserve_base_model"))
    jobs = {}
    for task in tasks:
        body = {"model": base, "suffix": task, **JOBS[task],
                "training_file": upload(client, EXAMPLES / task / "train.jsonl"),
                "validation_file": upload(client, EXAMPLES / task / "dev.jsonl")}  # fmt: skip
        jobs[task] = client.post("/v1/fine_tuning/jobs", json=body).raise_for_status().json()["id"]
    done = {}
    for task, job_id in jobs.items():
        began = time.monotonic()
        while (job := client.get(f"/v1/fine_tuning/jobs/{job_id}").raise_for_status().json())["status"] in (
            "validating_files", "queued", "running"):  # fmt: skip
            time.sleep(1)  # polling a remote job: nothing to wait on but its record
        job["wall_s"] = time.monotonic() - began
        print(f"{task}: {job['status']} in {job['wall_s']:.0f} s, {job.get('ptserve_result')}", flush=True)
        if job["status"] != "succeeded":
            raise SystemExit(f"job for {task} ended {job['status']}: {job['error']}")
        done[task] = job
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", choices=list(JOBS), default=list(JOBS))
    ap.add_argument("--model-cache", default=os.environ.get("PTSERVE_MODEL_CACHE", DEFAULT_MODEL_CACHE))
    ap.add_argument("--write", action="store_true", help="write the table to bench/results/")
    args = ap.parse_args()
    model = resolve_model(None, args.model_cache)
    artifacts = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(model, str(Path(tmp) / "store"))
        try:
            with httpx.Client(base_url=url, timeout=120) as client:
                jobs = train(client, args.tasks)
                for task, job in jobs.items():
                    if job["fine_tuned_model"] is not None:
                        data = client.get(f"/v1/tasks/{task}/artifact").raise_for_status().content
                        artifacts[task] = read_artifact(data)
        finally:
            proc.terminate()
            proc.wait()
    loaded = load_model(model, device="cpu", dtype="float32")
    lines = [
        f"# example tasks trained through the fine-tuning API, {date.today()}, {platform.node()} "
        f"({platform.machine()}, CPU, {os.cpu_count()} cores)",
        "default model, float32, greedy; one job per task with its README's settings; scored on the test splits "
        "by bench/example_tasks.py's code",
        "",
        "| task | metric | test | through the API | shipped prompt (examples/README.md) | best epoch | dev at start "
        "-> best | job wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, job in jobs.items():
        _, kind, new = TASKS[task]
        data = rows(task, "test")
        result = job["ptserve_result"]
        key = "dev_accuracy" if kind == "classify" else "dev_loss"
        figure = f"{score(loaded, artifacts[task], task, kind, new, data):.3f}" if task in artifacts else "not stored"
        lines.append(f"| {task} | {METRIC[task]} | {len(data)} | {figure} | {SHIPPED[task]:.3f} | "
                     f"{result['best_epoch']} | {key} {result['start_' + key]:.3f} -> {result[key]:.3f} | "
                     f"{job['wall_s']:.0f} |")  # fmt: skip
        print(lines[-1], flush=True)
    report(lines, "fine-tuning-quality", args.write)


if __name__ == "__main__":
    main()
