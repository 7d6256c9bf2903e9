"""Prompt artifacts, templates and the stores that keep them (disk or Redis)."""

from .artifact import PromptArtifact, artifact_bytes, load_artifact, make_artifact, read_artifact, save_artifact
from .errors import (
    ArtifactError,
    InvalidRequest,
    InvalidTaskId,
    PayloadTooLarge,
    PtserveError,
    StoreUnavailable,
    TaskNotFound,
    TemplateError,
)
from .store import PromptStore, StoredPrompt, check_task_id, open_store
from .template import Template, parse_template, render

__all__ = [
    "ArtifactError",
    "InvalidRequest",
    "InvalidTaskId",
    "PayloadTooLarge",
    "PromptArtifact",
    "PromptStore",
    "PtserveError",
    "StoreUnavailable",
    "StoredPrompt",
    "TaskNotFound",
    "Template",
    "TemplateError",
    "artifact_bytes",
    "check_task_id",
    "load_artifact",
    "make_artifact",
    "open_store",
    "parse_template",
    "read_artifact",
    "render",
    "save_artifact",
]
