"""Training on the served model, on the scheduler's thread, between inference
iterations (issue 21's fine-tuning jobs).

The model is frozen: a run trains a prompt table (`ptuning.train.PromptTrainer`,
the trainer `ptserve train` uses), one forward and backward pass at a time
(`PromptTrainer.steps`). Only the scheduler's thread touches the model, so it
runs those passes too, and decides when:

- inference comes first: a pass runs after the iteration's inference work;
- with no inference waiting or running for QUIET_S, passes run back to back
  (the gaps between a client's requests are not idleness);
- with inference running, training gets at most `share` of the model's time:
  each inference forward earns training `share / (1 - share)` of its own
  seconds, each pass spends what it took, and a pass runs only on credit.

A pass is one forward (and backward) pass over a few examples, so the running
rows wait for at most one pass. Its size follows the load: while inference is
busy, `busy_pass_size` examples (PTSERVE_TRAIN_MICRO_BATCH_SIZE: as short a
pass as the trainer has); when idle, a whole batch up to `idle_pass_size`
(PTSERVE_TRAIN_IDLE_PASS_SIZE: fewer, larger passes train faster, and take
more memory).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

QUIET_S = 1.0  # inference counts as running until it has been idle this long


@dataclass(eq=False)
class TrainingRun:
    """A training job's passes, as the scheduler runs them. `events` is a
    PromptTrainer.steps iterator (or anything that yields progress events and
    ends with one whose `result` is set), built with `self.pass_size` as its
    pass_size: it asks before each pass how many examples the pass may take."""

    events: Iterator | None = None
    busy_pass_size: int | None = None  # examples per pass while inference is busy (None: the run's own)
    idle_pass_size: int | None = None  # examples per pass when idle, at most (None: the run's own, a whole batch)
    id: int = 0  # the scheduler's, as for a request: its Output records carry it
    _size: int | None = None  # the pass about to run may take this many examples

    def pass_size(self) -> int | None:
        return self._size

    def step(self, busy: bool = False):
        """One pass, sized for the load; -> the event it yielded. Grad on: the
        scheduler's inference runs without."""
        self._size = self.busy_pass_size if busy else self.idle_pass_size
        with torch.inference_mode(False), torch.enable_grad():
            return next(self.events)


@dataclass
class TrainingShare:
    """How much of the model's time training may take while inference runs."""

    share: float  # in (0, 1]
    credit: float = field(default=0.0)  # seconds of model time training may take now
    last_inference: float = float("-inf")  # time.monotonic() at the end of the last inference forward
    # totals since startup, for /v1/stats and /metrics (written by the scheduler's thread only)
    passes: int = 0
    training_seconds: float = 0.0
    inference_seconds: float = 0.0

    def earned(self, inference_seconds: float) -> None:
        """An inference forward ran this long: training earns its share of it (at
        most one second of credit piles up, so an idle run cannot save for a burst)."""
        self.inference_seconds += inference_seconds
        self.last_inference = time.monotonic()
        if self.share >= 1:
            self.credit = 1.0
            return
        self.credit = min(1.0, self.credit + inference_seconds * self.share / (1 - self.share))

    def busy(self, inference_waiting_or_running: bool) -> bool:
        """Whether training must stay within its share now."""
        return inference_waiting_or_running or time.monotonic() - self.last_inference < QUIET_S

    def idle_wait(self) -> float:
        """With no inference waiting or running: seconds until a pass may run (0: now)."""
        if self.credit > 0:
            return 0.0
        return max(0.0, QUIET_S - (time.monotonic() - self.last_inference))

    def may_run(self, inference_busy: bool) -> bool:
        return not inference_busy or self.credit > 0

    def spent(self, seconds: float, inference_busy: bool) -> None:
        self.passes += 1
        self.training_seconds += seconds
        if inference_busy:
            self.credit -= seconds
