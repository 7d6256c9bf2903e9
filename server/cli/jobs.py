"""`ptserve jobs`: fine-tuning jobs on a running server (OpenAI's API shape,
see docs/training.md): create one from JSONL files and follow it, watch,
cancel or list. Torch-free, like the other client commands."""

from __future__ import annotations

import time

from .client import _client, _client_args, _print
from .common import Command, json_arg

TERMINAL = ("succeeded", "failed", "cancelled")


def _arguments(p) -> None:
    p.add_argument("action", choices=["create", "watch", "cancel", "list"])
    p.add_argument("job_id", nargs="?", help="watch, cancel: the job")
    p.add_argument("--data", help="create: the training JSONL file")
    p.add_argument("--dev", help="create: a validation JSONL file (default: a quarter of --data, held out)")
    p.add_argument("--task-id", help="create: the task to train (a new one, or a new version)")
    go_on = "create: train the task's current version further (its template, task type and labels), not a new prompt"
    p.add_argument("--go-on", action="store_true", help=go_on)
    p.add_argument("--task-type", choices=["classify", "generate"])
    p.add_argument("--labels", help='create, classify: JSON object label -> verbalizer, e.g. \'{"pos": " great"}\'')
    p.add_argument("--template")
    p.add_argument("--from-prompt")
    p.add_argument("--encoder", choices=["lstm", "mlp", "none"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr-multiplier", type=float, help="times ptserve train's default learning rate")
    p.add_argument("--seed", type=int)
    p.add_argument("--promote", choices=["if_better", "always"])
    p.add_argument("--no-watch", action="store_true", help="create: print the job and return")
    _client_args(p)


def _run(args) -> None:
    client = _client(args, "write")
    if args.action == "list":
        return _print(client.jobs()["data"])
    if args.action == "create":
        return _create(client, args)
    if not args.job_id:
        raise ValueError(f"jobs {args.action} needs the job id")
    if args.action == "cancel":
        return _print(client.cancel_job(args.job_id))
    _watch(client, args.job_id)


def _create(client, args) -> None:
    if not args.data or not args.task_id:
        raise ValueError("jobs create needs --data and --task-id")
    model = args.task_id if args.go_on else client.base_model()
    body = {"model": model, "training_file": client.upload_file(args.data)["id"], "suffix": args.task_id}
    if args.dev:
        body["validation_file"] = client.upload_file(args.dev)["id"]
    hyper = {"n_epochs": args.epochs, "batch_size": args.batch_size, "learning_rate_multiplier": args.lr_multiplier}
    body["hyperparameters"] = {k: v for k, v in hyper.items() if v is not None}
    ours = {k: getattr(args, k) for k in ("task_type", "template", "from_prompt", "encoder", "seed", "promote")}
    ours["labels"] = json_arg("--labels", args.labels)
    body.update({k: v for k, v in ours.items() if v is not None})
    job = client.create_job(body)
    if args.no_watch:
        return _print(job)
    print(f"job {job['id']} ({job['hyperparameters']['n_epochs']} epochs)", flush=True)
    _watch(client, job["id"])


def _watch(client, job_id: str) -> None:
    """Print each event as it comes, with a bar over the epochs, until the job ends."""
    from tqdm.auto import tqdm

    job = client.job(job_id)
    seen: set[str] = set()
    with tqdm(total=job["hyperparameters"]["n_epochs"], desc=job_id, unit="epoch") as bar:
        while True:
            job = client.job(job_id)  # before the events: the last event is in once the status is final
            for event in client.job_events(job_id):
                if event["id"] in seen:
                    continue
                seen.add(event["id"])
                bar.write(event["message"])
                if event.get("type") == "metrics" and event["data"].get("epoch", 0) >= 1:
                    bar.update(event["data"]["epoch"] - bar.n)
            if job["status"] in TERMINAL:
                break
            time.sleep(1)
    print(f"{job['status']}: fine_tuned_model={job['fine_tuned_model']}", flush=True)
    if job["status"] != "succeeded":
        raise ValueError(f"job {job_id} {job['status']}: {(job.get('error') or {}).get('message', '')}")


JOBS = Command("jobs", "fine-tuning jobs on a running server: create (and follow), watch, cancel, list",
               _arguments, _run)  # fmt: skip
