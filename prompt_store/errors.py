"""Errors of the prompt store, the artifact format and templates: refinements
of the request errors in ptcore/errors.py, so that each maps to the status of
its base class."""

from ptcore.errors import DeadlineExceeded, InvalidRequest, ServiceUnavailable


class ArtifactError(InvalidRequest):
    """An uploaded prompt artifact is malformed or does not fit the served model."""


class TemplateError(InvalidRequest):
    """A template string cannot be parsed, or fields do not fit it."""


class InvalidTaskId(InvalidRequest):
    """A task id outside 1-128 characters of A-Z a-z 0-9 . _ -."""


class StoreUnavailable(ServiceUnavailable):
    """The prompt store cannot be reached."""


class StoredPromptDamaged(StoreUnavailable):
    """A stored artifact does not match the digest recorded with it, or does not
    parse: the store's fault, not the client's. Uploading the same artifact again
    repairs the task; `ptserve store check` finds every such version."""

    why: str = ""  # what is wrong with it, in words


class StoreOutcomeUnknown(DeadlineExceeded):
    """A write was sent but the store did not confirm it in time: it may or may
    not have happened. Repeating the same upload is safe (see store.py)."""
