"""The errors a request can end in, whatever part of ptserve raises them.

Each carries a message meant for the user: it must say what was wrong. Nothing
here knows about HTTP; server/api/app.py maps each class to its status code.
Errors of the prompt store and the artifact format refine these in
prompt_store/errors.py; those of HTTP alone (tokens, headers) live in
server/api/errors.py.
"""


class PtserveError(Exception):
    """Base class: every error here carries a message meant for the user."""


class InvalidRequest(PtserveError, ValueError):
    """The request does not fit its task: a missing field, the wrong task type, a limit.
    `param`: the request field at fault, where one is (OpenAI's error.param)."""

    def __init__(self, message: str = "", param: str | None = None):
        super().__init__(message)
        self.param = param


class PayloadTooLarge(PtserveError):
    """A body or an artifact above the configured size limit."""


class NotFound(PtserveError, KeyError):
    """Nothing is stored under this id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "not found"


class TaskNotFound(NotFound):
    """No prompt is stored under this task id."""


class ServiceUnavailable(PtserveError):
    """The server cannot take this request now: shutting down, or its store is down."""


class Overloaded(PtserveError):
    """The request queue is full: try again shortly."""


class DeadlineExceeded(PtserveError):
    """A request ran past the server's request timeout."""


class Abandoned(PtserveError):
    """Work stopped because its caller no longer wants it (nobody reads this)."""
