"""Who may call what: the routes that need a token, and the bearer-token check.
The request gate (server/api/request_gate.py) applies them before any body is read.

- write access (uploads, deletes, artifact downloads): PTSERVE_API_TOKEN;
- inference access (generate, classify, the OpenAI routes): PTSERVE_INFERENCE_TOKEN.
An unset token leaves its routes open; routes not listed here are open.
"""

from __future__ import annotations

import hmac
from enum import Enum

from starlette.datastructures import Headers
from starlette.routing import compile_path

from server.api.errors import BadRequest, Forbidden, Unauthorized
from server.settings import Settings


class Access(str, Enum):
    WRITE = "write"
    INFERENCE = "inference"


# (method, route) -> the access it needs. HEAD is checked as GET.
POLICY = {
    ("PUT", "/v1/tasks/{task_id}"): Access.WRITE,
    ("PUT", "/v1/tasks/{task_id}/peft"): Access.WRITE,
    ("DELETE", "/v1/tasks/{task_id}"): Access.WRITE,
    ("GET", "/v1/tasks/{task_id}/artifact"): Access.WRITE,  # the trained prompt is its owner's asset
    ("POST", "/v1/tasks/{task_id}/generate"): Access.INFERENCE,
    ("POST", "/v1/tasks/{task_id}/classify"): Access.INFERENCE,
    ("POST", "/v1/handwritten/generate"): Access.INFERENCE,
    ("POST", "/v1/handwritten/classify"): Access.INFERENCE,
    ("POST", "/v1/completions"): Access.INFERENCE,
    ("GET", "/v1/models"): Access.INFERENCE,
    # fine-tuning: files and jobs write tasks, and training data is its owner's asset
    **{
        (m, route): Access.WRITE
        for m, route in [
            ("POST", "/v1/files"),
            ("GET", "/v1/files"),
            ("GET", "/v1/files/{file_id}"),
            ("GET", "/v1/files/{file_id}/content"),
            ("DELETE", "/v1/files/{file_id}"),
            ("POST", "/v1/fine_tuning/jobs"),
            ("GET", "/v1/fine_tuning/jobs"),
            ("GET", "/v1/fine_tuning/jobs/{job_id}"),
            ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"),
            ("GET", "/v1/fine_tuning/jobs/{job_id}/events"),
        ]
    },
}
_PATTERNS = [(method, compile_path(route)[0], access) for (method, route), access in POLICY.items()]


def access_for(method: str, path: str) -> Access | None:
    """The access a request needs, from its method and path; None: open."""
    method = "GET" if method == "HEAD" else method
    return next((access for m, regex, access in _PATTERNS if m == method and regex.match(path)), None)


def bearer_token(headers: Headers) -> str | None:
    """The token of the request's Authorization header, None without a bearer one.
    Two Authorization headers are refused: servers and proxies disagree on which
    one counts, so a request must not depend on that choice."""
    values = headers.getlist("authorization")
    if len(values) > 1:
        raise BadRequest(f"the request has {len(values)} Authorization headers; send exactly one")
    if not values:
        return None
    scheme, _, token = values[0].partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _same(token: str, expected: str) -> bool:
    # compare_digest: the time taken does not reveal how much of the token matched
    return hmac.compare_digest(token.encode(), expected.encode())


def check_access(headers: Headers, access: Access, settings: Settings) -> None:
    """Raises BadRequest (400), Unauthorized (401) or Forbidden (403: the inference
    token on a write route)."""
    token = bearer_token(headers)
    if access is Access.WRITE:
        expected, name, what = settings.api_token, "PTSERVE_API_TOKEN", "the write token"
    else:
        expected, name, what = settings.inference_token, "PTSERVE_INFERENCE_TOKEN", "the inference token"
    if expected is None or (token is not None and _same(token, expected)):
        return
    inference = settings.inference_token
    if access is Access.WRITE and token is not None and inference is not None and _same(token, inference):
        raise Forbidden(
            "this is the inference token; uploads, deletes and artifact downloads need the write token "
            "(PTSERVE_API_TOKEN)"
        )
    raise Unauthorized(f"this route needs an 'Authorization: Bearer <token>' header with {what} ({name})")
