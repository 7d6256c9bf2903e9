"""Request and response bodies of the REST API."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.engine.request import SAMPLING_KEYS

# JSON's own types, no coercion: true is not the number 1, 3.0 is not a count,
# "yes" is not a boolean (pydantic's default would take all three)
Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True)]  # an integer is still a number: 1 -> 1.0
Bool = Annotated[bool, Field(strict=True)]


class InferenceInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | None = Field(None, description="fills {input} of a single-field template")
    inputs: dict[str, str] | None = Field(None, description="fills every field of the template by name")
    version: Int | None = Field(None, ge=1, description="a version of the task the store keeps (GET "
                                "/v1/tasks/{id}/versions); unset: the latest")  # fmt: skip

    @model_validator(mode="after")
    def _one_of(self):
        if (self.input is None) == (self.inputs is None):
            raise ValueError("give exactly one of 'input' (a string) or 'inputs' (an object of field -> text)")
        return self

    def fields(self) -> dict[str, str]:
        return {"input": self.input} if self.input is not None else dict(self.inputs)


class GenerateRequest(InferenceInputs):
    """Unset fields fall back to the task artifact's `generation` defaults, then
    the server's. Ranges are checked in server/engine/request.py (SamplingParams)."""

    max_new_tokens: Int | None = Field(None, description=">= 1, up to the server's limit")
    temperature: Float | None = Field(None, description="0 = greedy (the default), else 0.001-100")
    top_p: Float | None = Field(None, description="nucleus sampling mass in (0, 1]; 1 = off")
    top_k: Int | None = Field(None, description="keep the k most likely tokens; 0 = off")
    stop: str | list[str] | None = Field(None, description="stop strings; not included in the text")
    seed: Int | None = Field(None, description="0 <= seed < 2**63; same seed, same draws")
    ignore_eos: Bool | None = Field(None, description="true: go on past end-of-sequence up to max_new_tokens")
    stream: Bool = Field(False, description="server-sent events: text deltas, then the whole answer")

    def sampling_overrides(self) -> dict:
        return self.model_dump(include=set(SAMPLING_KEYS))


class ClassifyRequest(InferenceInputs):
    pass


def no_version(cls, version):
    if version is not None:
        raise ValueError("a hand-written prompt has no versions: leave 'version' out")
    return version


class HandWrittenGenerateRequest(GenerateRequest):
    _no_version = field_validator("version")(no_version)
    template: str = Field(description="the hand-written prompt: words and {field} holes, e.g. "
                          "'The official language of {input} is'")  # fmt: skip


class HandWrittenClassifyRequest(ClassifyRequest):
    _no_version = field_validator("version")(no_version)
    template: str = Field(description="the hand-written prompt: words and {field} holes")
    labels: dict[str, str] = Field(description="label -> verbalizer, scored after the rendered prompt")


class GenerateResponse(BaseModel):
    task_id: str
    version: int
    text: str
    token_ids: list[int]
    finish_reason: str


class ClassifyResponse(BaseModel):
    task_id: str
    version: int
    label: str
    scores: dict[str, float]


class TaskSummary(BaseModel):
    model_config = ConfigDict(extra="allow")

    task_id: str
    version: int
    task_type: str
    num_virtual_tokens: int
    template: str
    labels: dict[str, str] | None = None
    versions: list[int] | None = Field(None, description="the kept versions, newest first (in task lists and "
                                       "GET /v1/tasks/{id})")  # fmt: skip


class CompletionRequest(BaseModel):
    """OpenAI's /v1/completions, for one prompt. `model` names the task; `prompt`
    fills its {input}. Unset sampling fields use the task's defaults (greedy unless
    the artifact says otherwise), not OpenAI's temperature 1."""

    model_config = ConfigDict(extra="ignore")  # clients send fields we have no use for (user, ...)

    model: str
    prompt: str | list[str]
    max_tokens: Int | None = Field(16, description="OpenAI's default is 16")
    temperature: Float | None = None
    top_p: Float | None = None
    top_k: Int | None = Field(None, description="not OpenAI's, as vLLM takes it: keep the k most likely tokens "
                              "(0 or -1: off)")  # fmt: skip
    stop: str | list[str] | None = None
    seed: Int | None = None
    stream: Bool = False
    n: Int = 1
    echo: Bool = False
    logprobs: Int | None = None
    # OpenAI's, without an engine counterpart: refused unless neutral, never dropped silently
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logit_bias: dict[str, Float] | None = None
    best_of: Int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _supported(self):
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("one prompt per request: send 'prompt' as a string or a list of one string")
        if self.n != 1:
            raise ValueError(f"n must be 1 (one completion per request; send several requests), got {self.n}")
        if self.echo or self.logprobs is not None:
            raise ValueError("echo and logprobs are not supported")
        neutral = {"presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
                   "best_of": (None, 1), "suffix": (None,)}  # fmt: skip
        for name, values in neutral.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name} is not supported by this server; leave it out")
        return self

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def sampling_overrides(self) -> dict:
        return {"max_new_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": 0 if self.top_k == -1 else self.top_k, "stop": self.stop, "seed": self.seed}  # fmt: skip
