"""What PromptTrainer.steps yields: a Step after each forward and backward
pass, a Scored after each pass over part of the dev set, an EpochEnd after each
epoch's evaluation, a Note for the user, and Done with the result."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Step:
    """One forward and backward pass: `done` of the `examples` of batch `batch` of
    `batches` in `epoch` have been through it (the optimizer steps when done ==
    examples); `loss`: the running mean over batches done (None before the first)."""

    epoch: int
    batch: int
    batches: int
    done: int
    examples: int
    loss: float | None


@dataclass
class Scored:
    """One forward pass of the dev set's scoring after `epoch` (0: the starting
    prompt, or the version a job compares with): `done` of `examples` scored."""

    epoch: int
    done: int
    examples: int


@dataclass
class EpochEnd:
    """An epoch's figures (epoch 0: the starting prompt, before any step); `best`: kept so far."""

    metrics: dict
    best: bool


@dataclass
class Note:
    """Something the user should know about the run (ptserve train prints it; a job makes it an event)."""

    message: str


@dataclass
class Done:
    result: object  # a ptuning.train.TrainResult: the artifact and each epoch's figures
