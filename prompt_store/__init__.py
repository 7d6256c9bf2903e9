"""Prompt artifacts, templates and the stores that keep them (disk or Redis)."""

from .artifact import PromptArtifact, artifact_bytes, load_artifact, make_artifact, read_artifact, save_artifact
from .errors import ArtifactError, InvalidTaskId, StoreOutcomeUnknown, StoreUnavailable, TemplateError
from .factory import open_store
from .store import PromptStore, StoredPrompt, check_task_id
from .template import Template, parse_template, render

__all__ = [
    "ArtifactError",
    "InvalidTaskId",
    "PromptArtifact",
    "PromptStore",
    "StoreOutcomeUnknown",
    "StoreUnavailable",
    "StoredPrompt",
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
