"""TrainConfig: what a P-tuning run is asked to do. Torch-free, so that the
command line reads its defaults and help (`ptserve train`) without loading the
trainer; `ptuning.train` re-exports it. Each field's help is its metadata's
"help", worded for the `--flag` of the same name."""

from __future__ import annotations

from dataclasses import dataclass, field

from ptcore.errors import InvalidRequest

TASK_TYPES = ("classify", "generate")


def _help(default, text: str):
    return field(default=default, metadata={"help": text})


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainConfig:
    task_type: str = field(
        default="classify", metadata=_help("classify: a label per input; generate: an output text per input")
    )
    template: str | None = field(
        default=None,
        metadata=_help(
            "default: [P:3]{input}[P:3] (causal); masked LMs and encoders: the same between the tokenizer's CLS "
            "and MASK, SEP, e.g. [CLS][P:3]{input}[P:3][MASK][SEP]"
        ),
    )
    from_prompt: str | None = field(
        default=None,
        metadata=_help(
            "start from a manual prompt, e.g. 'The official language of {input} is': its words become pseudo "
            "tokens started at their own embeddings (epoch 0 = the manual prompt)"
        ),
    )
    labels: dict[str, str] | None = field(
        default=None, metadata=_help('classify: JSON object label -> verbalizer, e.g. \'{"pos": " great"}\'')
    )
    encoder: str = field(
        default="lstm", metadata=_help("the prompt encoder: lstm (the paper's), mlp, or none (plain prompt tuning)")
    )
    epochs: int = field(
        default=20, metadata=_help("passes over the training examples at most; patience may stop sooner")
    )
    # the encoder is small, so a far larger rate than for fine-tuning
    lr: float = field(default=1e-2, metadata=_help("the prompt encoder's AdamW rate"))
    # slower than the prompt, so that the head does not memorise small sets
    head_lr: float = field(default=3e-3, metadata=_help("the AdamW rate of encoder models' linear head"))
    weight_decay: float = field(
        default=0.01, metadata=_help("AdamW decay of the encoder's networks and the head (not the prompt vectors)")
    )
    head_pooling: str = field(
        default="mean",
        metadata=_help("encoder models: the head reads the mean last hidden state or the one at [MASK]"),
    )
    batch_size: int = field(default=16, metadata=_help("examples per optimizer step"))
    micro_batch_size: int = field(
        default=0,
        metadata=_help("examples per forward and backward pass; gradients add up to batch_size (0: batch_size)"),
    )
    seed: int = field(default=0, metadata=_help("seeds the starting prompt, the example order and the dev split"))
    # 5 stopped small sets at epoch 6
    patience: int = field(default=10, metadata=_help("epochs without a better dev metric before stopping"))
    min_dev_examples: int = field(
        default=50,
        metadata=_help("a smaller dev set does not pick the epoch: all epochs run and the last is kept"),
    )
    train_prompt: bool = field(
        default=True, metadata=_help("False: the prompt stays at its start (a head-only baseline for encoders)")
    )
    progress: bool = field(default=True, metadata=_help("a progress bar with the running loss"))

    def __post_init__(self):
        # the trainer's own names for the choices; imported here, not above, to keep this module torch-free
        from prompt_store.artifact import HEAD_POOLINGS

        from .encoder import EncoderKind

        if self.encoder not in {k.value for k in EncoderKind}:
            raise InvalidRequest(f"encoder must be one of {[k.value for k in EncoderKind]}, got {self.encoder!r}")
        if self.template is not None and self.from_prompt is not None:
            raise InvalidRequest("give a template or from_prompt, not both")
        if self.head_pooling not in HEAD_POOLINGS:
            raise InvalidRequest(f"head_pooling must be one of {list(HEAD_POOLINGS)}, got {self.head_pooling!r}")
        if self.task_type not in TASK_TYPES:
            raise InvalidRequest(f"task_type must be classify or generate, got {self.task_type!r}")
        if self.task_type == "classify":
            if not isinstance(self.labels, dict) or not self.labels:
                raise InvalidRequest("a classify task needs labels: a JSON object label -> verbalizer text")
            bad = {k: v for k, v in self.labels.items() if not isinstance(v, str) or not v}
            if bad:
                raise InvalidRequest(f"every verbalizer must be a non-empty string; got {bad}")
        elif self.labels:
            raise InvalidRequest("labels are only for --task-type classify")
        if self.min_dev_examples < 1:
            raise InvalidRequest(f"min_dev_examples must be >= 1, got {self.min_dev_examples}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.head_lr <= 0:
            raise InvalidRequest(
                f"epochs and batch_size must be >= 1 and lr, head_lr > 0; got epochs={self.epochs}, "
                f"batch_size={self.batch_size}, lr={self.lr}, head_lr={self.head_lr}"
            )
        if self.micro_batch_size < 0:
            raise InvalidRequest(f"micro_batch_size must be >= 0 (0: batch_size), got {self.micro_batch_size}")
        if self.weight_decay < 0:
            raise InvalidRequest(f"weight_decay must be >= 0, got {self.weight_decay}")
