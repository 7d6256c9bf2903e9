"""Models and artifacts made locally: `ptserve models` (the model cache), `tiny-model`
(a random-weight smoke-test model) and `make-artifact` (a prompt from a tensor)."""

from __future__ import annotations

import sys

from .common import Command, add_model_cache, json_arg, model_cache


def _tiny_arguments(tiny) -> None:
    from ptcore.tiny_model import ARCHS  # torch, for this command only

    tiny.add_argument("directory")
    tiny.add_argument("--arch", choices=list(ARCHS), default="gpt2")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--init-std", type=float, default=0.5, help="weight scale; large = peaked outputs")


def _tiny_model(args) -> None:
    from ptcore.tiny_model import write_tiny_model

    path = write_tiny_model(args.directory, arch=args.arch, seed=args.seed, init_std=args.init_std)
    print(f"wrote a tiny {args.arch} smoke-test model (random weights, meaningless output) to {path}")


def _make_artifact_arguments(art) -> None:
    from ptcore.model_source import DEFAULT_MODEL

    art.add_argument("--model", help=f"the model the prompt is for (id, directory or GGUF file; default "
                     f"{DEFAULT_MODEL.name})")  # fmt: skip
    add_model_cache(art)
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


def _make_artifact(args) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from prompt_store.artifact import TENSOR_NAME, make_artifact, save_artifact
    from prompt_store.template import parse_template
    from ptcore.model import describe_model
    from ptcore.model_source import resolve_model

    path = resolve_model(args.model, model_cache(args))
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
    labels = json_arg("--labels", args.labels)
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


def _models_arguments(models) -> None:
    from ptcore.model_source import DEFAULT_MODEL

    models.add_argument(
        "--fetch-default", action="store_true",
        help=f"first download and convert the default model ({DEFAULT_MODEL.name}) unless it is cached",
    )  # fmt: skip
    add_model_cache(models)


def _models(args) -> None:
    from ptcore.model_source import DEFAULT_MODEL, ModelCache, default_model

    cache = ModelCache(model_cache(args))
    if args.fetch_default:
        print(f"default model {DEFAULT_MODEL.name}: {default_model(cache)}")
    entries = cache.entries()
    if not entries:
        print(f"no converted models in {cache.root}")
    for e in entries:
        print(f"{e.name}\tsha256:{e.source_sha256}\t{e.size_bytes / 1e6:.0f} MB\t{e.path}")


TINY_MODEL = Command(
    "tiny-model", "write a tiny RANDOM-WEIGHT smoke-test model (meaningless output)", _tiny_arguments, _tiny_model
)
MAKE_ARTIFACT = Command(
    "make-artifact", "write a prompt artifact for a model from a tensor (or random rows)",
    _make_artifact_arguments, _make_artifact,
)  # fmt: skip
MODELS = Command(
    "models", "list the converted models in the model cache (GGUF files, the default)", _models_arguments, _models
)
