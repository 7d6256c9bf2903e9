"""Request and response bodies of the REST API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class InferenceInputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: str | None = Field(None, description="fills {input} of a single-field template")
    inputs: dict[str, str] | None = Field(None, description="fills every field of the template by name")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.input is None) == (self.inputs is None):
            raise ValueError("give exactly one of 'input' (a string) or 'inputs' (an object of field -> text)")
        return self

    def fields(self) -> dict[str, str]:
        return {"input": self.input} if self.input is not None else dict(self.inputs)


class GenerateRequest(InferenceInputs):
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=100, description="0 = greedy (the default)")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="0 = off")
    stop: str | list[str] | None = Field(None, description="stop strings; not included in the text")
    seed: int | None = None

    def sampling_overrides(self) -> dict:
        return self.model_dump(include={"max_new_tokens", "temperature", "top_p", "top_k", "stop", "seed"})


class ClassifyRequest(InferenceInputs):
    pass


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
