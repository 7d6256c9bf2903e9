"""Checking a fine-tuning job's body before it is queued (server/fine_tuning/jobs.py)."""

from __future__ import annotations

from dataclasses import fields

from prompt_store.artifact import PromptArtifact, read_artifact
from prompt_store.store import check_task_id, is_task_id
from ptcore.errors import InvalidRequest, NotFound
from ptuning.data import Example, parse_examples, split_dev
from ptuning.train import PromptTrainer, TrainConfig
from server.fine_tuning.files import Files

DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}  # ptserve train's defaults
OURS = {"task_type", "labels", "template", "from_prompt", "encoder", "promote"}  # ptserve's fields beside OpenAI's
OPENAI = {"model", "training_file", "validation_file", "suffix", "hyperparameters", "seed", "metadata",
          "integrations", "method"}  # fmt: skip


def check_job(body: dict, base_model: str, loaded, files: Files, tasks, settings) -> dict:
    """A job body, checked: its files parse with its template and labels, its
    size is within the limits. -> what the job record needs (a 422 names the
    field at fault)."""
    unknown = set(body) - OURS - OPENAI
    if unknown:
        raise InvalidRequest(f"unknown field(s) {sorted(unknown)}")
    model = body.get("model")
    going_on = None if model == base_model else going_on_from(model, base_model, tasks, body)
    suffix = body.get("suffix", model if going_on is not None else None)
    if not isinstance(suffix, str):
        raise InvalidRequest("suffix names the task to train: a task id", "suffix")
    check_task_id(suffix)
    hyper = body.get("hyperparameters") or {}
    if not isinstance(hyper, dict) or set(hyper) - {"n_epochs", "batch_size", "learning_rate_multiplier"}:
        keys = "n_epochs, batch_size and learning_rate_multiplier"
        raise InvalidRequest(f"hyperparameters takes {keys}", "hyperparameters")
    epochs = _number(hyper.get("n_epochs", "auto"), int, 3, "hyperparameters.n_epochs")
    batch = _number(hyper.get("batch_size", "auto"), int, DEFAULTS["batch_size"], "hyperparameters.batch_size")
    mult = _number(hyper.get("learning_rate_multiplier", "auto"), float, 1.0,
                   "hyperparameters.learning_rate_multiplier")  # fmt: skip
    labels = body.get("labels") if going_on is None else going_on.labels
    task_type = body.get("task_type") or ("classify" if labels is not None else "generate")
    if going_on is not None:
        task_type = going_on.task_type
    seed = body.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise InvalidRequest(f"seed must be an integer in [0, 2**31), got {seed!r}", "seed")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in metadata.items())):  # fmt: skip
        raise InvalidRequest("metadata is at most 16 string pairs (keys up to 64 characters, values 512)",
                             "metadata")  # fmt: skip
    template = body.get("template") if going_on is None else going_on.meta["template"]
    config = {"task_type": task_type, "labels": labels, "template": template,
              "from_prompt": body.get("from_prompt"), "encoder": body.get("encoder") or "lstm",
              "epochs": epochs, "batch_size": batch, "lr": DEFAULTS["lr"] * mult, "seed": seed}  # fmt: skip
    if going_on is not None and going_on.head is not None:
        config["head_pooling"] = going_on.head_pooling  # as the version is served (absent: "mask")
    try:
        trainer = PromptTrainer(loaded, TrainConfig(**config, progress=False), going_on)
    except TypeError as e:
        raise InvalidRequest(str(e)) from None
    cfg = trainer.config
    if not trainer.template.fields:
        where = "from_prompt" if cfg.from_prompt is not None else "template"
        raise InvalidRequest(f"{where} {trainer.template_source!r} has no field such as {{input}} for the "
                             "examples' text", where)  # fmt: skip
    train = job_examples(files, body.get("training_file"), trainer, "training_file", settings.max_input_tokens)
    dev: list = []
    if body.get("validation_file") is not None:
        dev = job_examples(files, body["validation_file"], trainer, "validation_file", settings.max_input_tokens)
    else:  # a quarter of the training file is held out; it must leave both parts non-empty
        try:
            split_dev(train, 0.25, seed)
        except InvalidRequest as e:
            raise InvalidRequest(str(e), "training_file") from None
    examples = len(train) + len(dev)  # every epoch also scores the validation examples
    if epochs * examples > settings.max_job_example_passes:
        limit = settings.max_job_example_passes
        raise InvalidRequest(f"{epochs} epochs x {examples} examples (training and validation) is more than this "
                             f"server's limit of {limit} example passes per job", "hyperparameters")  # fmt: skip
    promote = body.get("promote", "if_better")
    if promote not in ("if_better", "always"):
        raise InvalidRequest(f"promote must be 'if_better' or 'always', got {promote!r}", "promote")
    return {"model": model, "training_file": body["training_file"], "validation_file": body.get("validation_file"),
            "suffix": suffix, "config": config, "promote": promote, "examples": len(train),
            "going_on": None if going_on is None else model,
            "hyperparameters": {"n_epochs": epochs, "batch_size": batch,
                                "learning_rate_multiplier": mult}}  # fmt: skip


def going_on_from(model, base_model: str, tasks, body: dict) -> PromptArtifact:
    """A job whose `model` is a task: it goes on from the task's current
    version, with that version's template, task type and labels."""
    if not isinstance(model, str) or not is_task_id(model):
        raise InvalidRequest(f"model must be the served base model {base_model!r} or a task id (GET /v1/tasks), "
                             f"got {model!r}", "model")  # fmt: skip
    try:
        stored = tasks.artifact(model)
    except NotFound:
        raise InvalidRequest(f"model {model!r} is neither the served base model {base_model!r} (GET /v1/models) nor "
                             "a stored task (GET /v1/tasks)", "model") from None  # fmt: skip
    for key in ("template", "from_prompt", "labels", "task_type"):
        if body.get(key) is not None:
            raise InvalidRequest(f"model {model!r} is a task: the job goes on from its version {stored.version} with "
                                 f"its template, task type and labels; leave out {key}", key)  # fmt: skip
    return read_artifact(stored.data)


def job_examples(files: Files, file_id, trainer: PromptTrainer, param: str, max_tokens: int) -> list[Example]:
    """The examples of a training or validation file, checked as the trainer (and
    the server, at upload) would check them, each at most `max_tokens` tokens
    (PTSERVE_MAX_INPUT_TOKENS, as a request)."""
    config = trainer.config
    if not isinstance(file_id, str):
        raise InvalidRequest(f"{param} must be a file id from POST /v1/files", param)
    try:
        text = files.content(file_id).decode("utf-8")
        examples = parse_examples(text.splitlines(), file_id, trainer.template, config.task_type, config.labels)
        trainer.check(examples, max_tokens)
    except NotFound:
        raise InvalidRequest(f"{param}: no file {file_id!r}", param) from None
    except InvalidRequest as e:
        raise InvalidRequest(str(e), param) from None
    return examples


def _number(value, kind, auto, param: str):
    if value == "auto":
        return auto
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1000
    if not ok or (kind is int and (not isinstance(value, int) or value < 1)):
        raise InvalidRequest(f"{param} must be 'auto' or a {kind.__name__} in (0, 1000], got {value!r}", param)
    return kind(value)
