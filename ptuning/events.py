"""What PromptTrainer.steps yields: a Step after each forward and backward
pass, an EpochEnd after each epoch's evaluation, and Done with the result."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Step:
    """One forward and backward pass: micro-batch `micro` of `micros` of batch
    `batch` of `batches` in `epoch` (the optimizer steps after the last micro-batch);
    `loss`: the running mean over batches done (None before the first)."""

    epoch: int
    batch: int
    batches: int
    micro: int
    micros: int
    loss: float | None


@dataclass
class EpochEnd:
    """An epoch's figures (epoch 0: the starting prompt, before any step); `best`: kept so far."""

    metrics: dict
    best: bool


@dataclass
class Done:
    result: object  # a ptuning.train.TrainResult: the artifact and each epoch's figures
