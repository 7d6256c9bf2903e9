"""`ptserve import-peft` and `ptserve export-peft`: PEFT prompt-tuning adapters in and out."""

from __future__ import annotations

import sys

from .common import MODEL_FAMILIES, Command, add_model_cache, model_cache, token


def _import_arguments(imp) -> None:
    imp.add_argument("directory", help="folder with adapter_config.json and adapter_model.safetensors")
    imp.add_argument("--task-id", required=True)
    imp.add_argument("--push", metavar="URL", help="upload to a running server, which converts for its model")
    imp.add_argument("-o", "--output", help="write the artifact here (converted locally)")
    imp.add_argument("--model", help="the base model, for -o (default: the adapter's base_model_name_or_path)")
    imp.add_argument("--model-family", default="auto", choices=MODEL_FAMILIES)
    add_model_cache(imp)
    imp.add_argument("--token", help="bearer token for --push (default: PTSERVE_API_TOKEN)")


def _import_peft(args) -> None:
    from pathlib import Path

    from prompt_store.artifact import save_artifact
    from prompt_store.peft import CONFIG_FILE, WEIGHTS_FILE, artifact_from_peft, parse_peft_config
    from prompt_store.store import check_task_id
    from ptclient.client import PtserveClient
    from ptcore.model import default_bos_token, load_model

    if not args.push and not args.output:
        sys.exit("give --push URL (the server converts for its model) and/or -o FILE (converted here, needs a model)")
    check_task_id(args.task_id)
    folder = Path(args.directory)
    if args.output:
        config = parse_peft_config((folder / CONFIG_FILE).read_bytes())
        model = args.model or config.get("base_model_name_or_path")
        if not model:
            sys.exit(f"{CONFIG_FILE} names no base model: give --model")
        loaded = load_model(
            model, device="cpu", dtype="float32", family=args.model_family, model_cache=model_cache(args)
        )
        artifact = artifact_from_peft(
            config, (folder / WEIGHTS_FILE).read_bytes(), base_model=loaded.info,
            bos_token=default_bos_token(loaded.tokenizer),
        )  # fmt: skip
        artifact.meta["task_id"] = args.task_id
        save_artifact(artifact, args.output)
        print(f"wrote {args.output}: template {artifact.meta['template']!r}")
    if args.push:
        summary = PtserveClient(args.push, token(args, "write")).push_peft(args.task_id, folder)
        print(f"pushed to {args.push}: task {summary['task_id']} version {summary['version']}, "
              f"template {summary['template']!r}")  # fmt: skip


def _export_arguments(exp) -> None:
    exp.add_argument("artifact")
    exp.add_argument("-o", "--output", required=True, help="the folder to write")
    exp.add_argument("--model", help="the base model (default: the artifact's base_model.name_or_path)")
    add_model_cache(exp)


def _export_peft(args) -> None:
    from transformers import AutoTokenizer

    from prompt_store.artifact import load_artifact
    from prompt_store.peft import export_peft
    from ptcore.model import default_bos_token
    from ptcore.model_source import resolve_model

    artifact = load_artifact(args.artifact)
    base = artifact.base_model
    model = resolve_model(args.model or base["name_or_path"], model_cache(args),
                          source_sha256=None if args.model else base.get("source_sha256"))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model)  # BOS rule only
    out = export_peft(artifact, args.output, default_bos_token(tokenizer))
    print(f"wrote PEFT PROMPT_TUNING adapter to {out}")


IMPORT_PEFT = Command(
    "import-peft", "convert a PEFT prompt-tuning / P-tuning adapter folder", _import_arguments, _import_peft
)
EXPORT_PEFT = Command(
    "export-peft", "write a prefix-only artifact as a PEFT PROMPT_TUNING folder", _export_arguments, _export_peft
)
