"""One request as the engine sees it, its sampling parameters, and its results."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from prompt_store.template import lone_surrogate
from ptcore.errors import InvalidRequest
from ptcore.task_prompt import TaskPrompt

if TYPE_CHECKING:
    import torch

    from server.engine.text import TextStream

MIN_TEMPERATURE = 1e-3  # below this, logits / T overflows; use 0 for greedy
MAX_STOP_STRINGS = 16


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling parameters; the single place their rules live
    (requests and artifacts' `generation` defaults are both checked here)."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    stop: tuple[str, ...] = ()
    seed: int | None = None  # None = a fresh random seed
    ignore_eos: bool = False  # True: go on past end-of-sequence tokens up to max_new_tokens (benchmarks)

    def __post_init__(self):
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InvalidRequest(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        t = self.temperature
        if _is_int(t) or isinstance(t, float):
            ok = t == 0 or MIN_TEMPERATURE <= t <= 100
        else:
            ok = False
        if not ok:
            raise InvalidRequest(f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE} and 100, got {t!r}")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        stop_ok = all(isinstance(s, str) and s and lone_surrogate(s) is None for s in self.stop)
        if not stop_ok or len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(
                f"stop must be at most {MAX_STOP_STRINGS} non-empty strings without a lone surrogate, got {self.stop!r}"
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise InvalidRequest(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest(f"ignore_eos must be true or false, got {self.ignore_eos!r}")


SAMPLING_KEYS = tuple(f.name for f in fields(SamplingParams))  # what a request or an artifact may set


@dataclass(eq=False)
class Request:
    """One request, from submission to answer: what to run, and (for generate)
    its tokens, its random generator and its stop state.

    Once submitted, a request belongs to the scheduler's thread alone: the
    caller keeps only its id (set by `Scheduler.submit`) and hears back through
    Output records (server/engine/outputs.py)."""

    kind: str  # "generate" | "classify"
    prompt: TaskPrompt
    input_ids: list[int]  # rendered template; pseudo token i is vocab_size + i
    params: SamplingParams | None = None  # generate only
    stream: bool = False  # generate: hand over its text as it settles, not only at the end
    id: int = -1  # set by Scheduler.submit
    submitted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None  # time.monotonic() when its first token was chosen
    # generation state
    generator: torch.Generator | None = None
    text: TextStream | None = None
    finish_reason: str | None = None  # "stop" | "length" once done
    error: Exception | None = None
    streamed: int = 0  # characters of text already handed over in Output records
    reported: int = 0  # tokens already handed over in Output records

    @classmethod
    def generate(cls, prompt: TaskPrompt, input_ids: list[int], params: SamplingParams,
                 stream: bool = False) -> Request:  # fmt: skip
        return cls("generate", prompt, input_ids, params, stream)

    @classmethod
    def classify(cls, prompt: TaskPrompt, input_ids: list[int]) -> Request:
        return cls("classify", prompt, input_ids)

    @property
    def need(self) -> int:
        """Positions this request may fill: its input and every new token."""
        return len(self.input_ids) + self.params.max_new_tokens

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def add_token(self, token: int, eos_ids: frozenset[int]) -> None:
        """Record one chosen token and decide whether the request is done."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if token in eos_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
            self.text.finish()
        elif self.text.push(token):
            self.finish_reason = "stop"
        elif len(self.text.token_ids) >= self.params.max_new_tokens:
            self.finish_reason = "stop" if self.text.finish() else "length"

    def fail(self, error: Exception) -> None:
        self.error = error

    def new_text(self) -> str:
        """Streaming: the text no later token can change that no Output record has carried yet."""
        end = self.text.safe_end()
        if end <= self.streamed:
            return ""
        piece = self.text.text_between(self.streamed, end)
        self.streamed = end
        return piece

    def new_token_ids(self) -> tuple[int, ...]:
        """The tokens chosen since the last Output record."""
        ids = self.text.token_ids if self.text is not None else []
        new = tuple(ids[self.reported :])
        self.reported = len(ids)
        return new

    def result(self) -> GenerateResult | Exception:
        """Its answer, or the exception that answers it instead."""
        if self.error is not None:
            return self.error
        try:
            text = self.text.text  # a row that is not streamed and has no stop strings decodes only now
        except Exception as e:
            return e
        return GenerateResult(list(self.text.token_ids), text, self.finish_reason or "length",
                              self.prompt.version, len(self.input_ids))  # fmt: skip


@dataclass
class GenerateResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    version: int  # of the task's prompt it ran with
    prompt_tokens: int  # the rendered input, pseudo tokens included


@dataclass
class ClassifyResult:
    label: str
    scores: dict[str, float]  # label -> probability
    logprobs: dict[str, float]  # label -> summed log-probability of its verbalizer
    version: int  # of the task's prompt it ran with
