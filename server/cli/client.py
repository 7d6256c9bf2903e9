"""The commands that talk to a running server: push, generate, classify, tasks.
They import no torch (nor pydantic): they start fast."""

from __future__ import annotations

import json
import os

from .common import Command, json_arg, token


def _client_args(p) -> None:
    p.add_argument("--url", default=os.environ.get("PTSERVE_URL", "http://127.0.0.1:8000"),
                   help="the server (default: PTSERVE_URL or http://127.0.0.1:8000)")  # fmt: skip
    p.add_argument("--token", help="bearer token (default: PTSERVE_API_TOKEN for writes, "
                   "PTSERVE_INFERENCE_TOKEN for inference)")  # fmt: skip


def _client(args, access: str):
    from ptclient.client import PtserveClient

    return PtserveClient(args.url, token(args, access))


def _print(value) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _push_arguments(push) -> None:
    push.add_argument("path", help="task.safetensors, or a folder with adapter_config.json + adapter_model.safetensors")
    push.add_argument("--task-id", required=True)
    _client_args(push)


def _push(args) -> None:
    from pathlib import Path

    client = _client(args, "write")
    path = Path(args.path)
    _print(client.push_peft(args.task_id, path) if path.is_dir() else client.push(args.task_id, path.read_bytes()))


def _inference_arguments(p, generate: bool) -> None:
    p.add_argument("task_id")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--input", help="fills {input}")
    what.add_argument("--inputs", help='JSON object field -> text, e.g. \'{"premise": "...", "hypothesis": "..."}\'')
    p.add_argument("--json", action="store_true", help="print the whole answer, not just the text / label")
    if generate:
        p.add_argument("--max-new-tokens", type=int)
        p.add_argument("--temperature", type=float)
        p.add_argument("--top-p", type=float)
        p.add_argument("--top-k", type=int)
        p.add_argument("--seed", type=int)
        p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    _client_args(p)


def _generate(args) -> None:
    params = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")}
    params = {k: v for k, v in params.items() if v is not None}
    if args.stop:
        params["stop"] = args.stop
    fields = json_arg("--inputs", args.inputs)
    result = _client(args, "inference").generate(args.task_id, input=args.input, inputs=fields, **params)
    _print(result if args.json else result["text"])


def _classify(args) -> None:
    fields = json_arg("--inputs", args.inputs)
    result = _client(args, "inference").classify(args.task_id, input=args.input, inputs=fields)
    _print(result if args.json else result["label"])


def _tasks(args) -> None:
    _print(_client(args, "read").tasks())


PUSH = Command("push", "upload an artifact file (or a PEFT adapter folder) to a running server", _push_arguments, _push)
GENERATE = Command(
    "generate", "generate with a task on a running server", lambda p: _inference_arguments(p, True), _generate
)
CLASSIFY = Command(
    "classify", "classify with a task on a running server", lambda p: _inference_arguments(p, False), _classify
)
TASKS = Command("tasks", "list the tasks of a running server", _client_args, _tasks)
