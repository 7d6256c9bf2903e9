"""`ptserve train`: P-tuning a task's prompt on a frozen model. The flags that are
TrainConfig fields take their default and help from the field."""

from __future__ import annotations

import logging
import sys
from dataclasses import fields

from .common import MODEL_FAMILIES, Command, add_model_cache, json_arg, model_cache, token


def config_option(parser, name: str, **kwargs) -> None:
    """--NAME for TrainConfig field `name`: its default, its type, its help (metadata "help")."""
    from typing import get_type_hints

    from ptuning.config import TrainConfig  # torch-free, unlike ptuning.train

    field = next(f for f in fields(TrainConfig) if f.name == name)
    kind = get_type_hints(TrainConfig)[name]
    if kind in (int, float):
        kwargs.setdefault("type", kind)
    text = field.metadata["help"] + ("" if field.default is None else f" (default: {field.default})")
    parser.add_argument("--" + name.replace("_", "-"), default=field.default, help=text.replace("%", "%%"), **kwargs)


def _arguments(train) -> None:
    from prompt_store.artifact import HEAD_POOLINGS  # torch, for this command only
    from ptcore.model_source import DEFAULT_MODEL
    from ptuning.config import TASK_TYPES
    from ptuning.encoder import EncoderKind

    train.add_argument("--model", help="model id, directory or GGUF file (causal LM, masked LM or encoder); "
                       f"default: {DEFAULT_MODEL.name}")  # fmt: skip
    add_model_cache(train)
    train.add_argument("--data", required=True, help="JSONL: the template's fields + label (classify) / output")
    dev = train.add_mutually_exclusive_group()
    dev.add_argument("--dev", help="JSONL dev set (default: hold out --dev-fraction of --data)")
    dev.add_argument("--dev-fraction", type=float, default=0.2)
    config_option(train, "task_type", choices=list(TASK_TYPES))
    start = train.add_mutually_exclusive_group()
    config_option(start, "template")
    config_option(start, "from_prompt", metavar="TEMPLATE")
    config_option(train, "labels")
    config_option(train, "encoder", choices=[kind.value for kind in EncoderKind])
    config_option(train, "epochs")
    config_option(train, "lr")
    config_option(train, "head_lr")
    config_option(train, "weight_decay")
    config_option(train, "head_pooling", choices=list(HEAD_POOLINGS))
    config_option(train, "batch_size")
    config_option(train, "patience")
    config_option(train, "min_dev_examples")
    config_option(train, "seed")
    train.add_argument("--device", default="auto")
    train.add_argument("--model-family", default="auto", choices=MODEL_FAMILIES)
    train.add_argument("-o", "--output", required=True)
    train.add_argument(
        "--push", metavar="URL", help="upload the result to a running server, e.g. http://127.0.0.1:8000"
    )
    train.add_argument("--task-id")
    train.add_argument("--token", help="bearer token for --push (default: PTSERVE_API_TOKEN)")


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
    labels = json_arg("--labels", args.labels)
    config = TrainConfig(
        task_type=args.task_type, template=args.template, from_prompt=args.from_prompt, labels=labels,
        encoder=args.encoder, epochs=args.epochs, lr=args.lr, head_lr=args.head_lr, weight_decay=args.weight_decay,
        head_pooling=args.head_pooling, batch_size=args.batch_size, seed=args.seed, patience=args.patience,
        min_dev_examples=args.min_dev_examples,
    )  # fmt: skip
    loaded = load_model(
        args.model, device=args.device, dtype="float32", family=args.model_family, model_cache=model_cache(args)
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
        client = PtserveClient(args.push, token(args, "write"))
        summary = client.push(args.task_id, artifact_bytes(result.artifact))
        print(f"pushed to {args.push}: task {summary['task_id']} version {summary['version']}")


TRAIN = Command("train", "train a task's prompt (P-tuning) on a frozen model", _arguments, _train)
