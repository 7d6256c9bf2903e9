"""Errors shared by the store, the artifact format and the server.

Each one maps to one HTTP status in server/api/app.py; the message is what the
client reads, so it must say what was wrong.
"""


class PtserveError(Exception):
    """Base class: every error here carries a message meant for the user."""


class InvalidRequest(PtserveError, ValueError):
    """The request does not fit its task (missing field, wrong task type, limits) -> 422."""


class ArtifactError(InvalidRequest):
    """An uploaded prompt artifact is malformed or does not fit the served model -> 422."""


class TemplateError(InvalidRequest):
    """A template string cannot be parsed, or fields do not fit it -> 422."""


class InvalidTaskId(InvalidRequest):
    """A task id outside 1-128 characters of A-Z a-z 0-9 . _ - -> 422."""


class PayloadTooLarge(PtserveError):
    """An upload above the configured size limit -> 413."""


class TaskNotFound(PtserveError, KeyError):
    """No prompt stored under this task id -> 404."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "task not found"


class ServiceUnavailable(PtserveError):
    """The server cannot take this request now (shutting down, store down) -> 503."""


class Overloaded(PtserveError):
    """The request queue is full -> 429 with Retry-After."""


class DeadlineExceeded(PtserveError):
    """A request ran past the server's request timeout -> 504."""


class Abandoned(PtserveError):
    """Work stopped because its client left or its deadline passed (nobody reads this)."""


class Unauthorized(PtserveError):
    """A missing or wrong bearer token -> 401."""


class StoreUnavailable(ServiceUnavailable):
    """The prompt store cannot be reached -> 503."""


class StoreOutcomeUnknown(DeadlineExceeded):
    """A write was sent but the store did not confirm it in time: it may or may
    not have happened -> 504. Repeating the same upload is safe (see store.py)."""


class Forbidden(PtserveError):
    """A valid token, but not one that allows this route -> 403."""


class BadRequest(PtserveError):
    """A request that cannot be read one way only (e.g. two Authorization headers) -> 400."""
