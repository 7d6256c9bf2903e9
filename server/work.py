"""What the scheduler queues and the runner executes: one object per request."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

from .prompts import TaskPrompt


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None = a fresh random seed


@dataclass(eq=False)
class GenerateWork:
    prompt: TaskPrompt
    input_ids: list[int]  # rendered template; pseudo token i is vocab_size + i
    params: SamplingParams
    future: Future = field(default_factory=Future)
    kind = "generate"


@dataclass(eq=False)
class ClassifyWork:
    prompt: TaskPrompt
    input_ids: list[int]
    future: Future = field(default_factory=Future)
    kind = "classify"


@dataclass
class GenerateResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length"


@dataclass
class ClassifyResult:
    label: str
    scores: dict[str, float]  # label -> probability
    logprobs: dict[str, float]  # label -> summed log-probability of its verbalizer
