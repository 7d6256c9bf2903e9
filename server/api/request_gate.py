"""What a request must pass before any byte of its body is read: its token and
the size of its body."""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import Response

from ptcore.errors import PayloadTooLarge, PtserveError, ServiceUnavailable
from server.api.access import access_for, bearer_token, check_access
from server.api.errors import BadRequest
from server.settings import Settings

UPLOAD_SLACK = 64 * 1024  # multipart boundaries and part headers around a PEFT upload's files
STILL_ANSWERED = ("/health", "/ready", "/metrics", "/v1/stats")  # while shutting down (server/api/shutdown.py)


class RequestGate:
    """ASGI middleware. From the headers alone, before the body is read:
    - two Authorization headers: 400 (on every route);
    - the token the route needs (server/api/access.py): 401 / 403;
    - a declared Content-Length over the limit: 413;
    - while the server shuts down (server/api/shutdown.py): 503, except on
      STILL_ANSWERED (/ready says 503 itself).
    A body sent without a length (chunked) is counted as the app reads it and
    refused with 413 once it passes the limit. Whenever an answer goes out before
    its request's body was read to the end, the connection is closed, so the rest
    of the body is never read.

    Limits, here only: an artifact upload (PUT) max_artifact_bytes; a PEFT
    upload two such files and their multipart framing; a training file
    (POST /v1/files) max_file_bytes and its framing; any other body,
    max_json_bytes."""

    def __init__(self, app, settings: Settings, respond: Callable[[PtserveError, str], Response]):
        """respond: the app's answer to an error, so that refusals here read like the others."""
        self.app = app
        self.settings = settings
        self.respond = respond

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        limit = self._limit(scope)
        try:
            if _draining(scope) and route_path(scope) not in STILL_ANSWERED:
                raise ServiceUnavailable("server is shutting down")
            size = sum(len(name) + len(value) for name, value in scope["headers"])
            if size > self.settings.max_header_bytes:  # h11 checks only headers that arrive in pieces
                raise BadRequest(f"request headers are {size} bytes; the limit is {self.settings.max_header_bytes}")
            access = access_for(scope["method"], route_path(scope))
            if access is None:
                bearer_token(headers)  # refuses two Authorization headers
            else:
                check_access(headers, access, self.settings)
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
        except PtserveError as error:
            response = self.respond(error, route_path(scope))
            response.headers["connection"] = "close"
            return await response(scope, receive, send)

        chunked = "transfer-encoding" in headers
        seen, ended = 0, not chunked and (declared is None or declared == "0")

        async def counted_receive():
            nonlocal seen, ended
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                ended = not message.get("more_body", False)
                if seen > limit:
                    raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
            return message

        async def closing_send(message):
            if message["type"] == "http.response.start" and not ended:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, counted_receive, closing_send)

    def _limit(self, scope) -> int:
        """The one body limit of every route (the routes read what gets through)."""
        if scope["method"] == "POST" and route_path(scope) == "/v1/files":  # a training file, multipart
            return self.settings.max_file_bytes + UPLOAD_SLACK
        if scope["method"] != "PUT":
            return self.settings.max_json_bytes
        if route_path(scope).endswith("/peft"):  # a PEFT adapter: two files in one multipart body
            return 2 * self.settings.max_artifact_bytes + UPLOAD_SLACK
        return self.settings.max_artifact_bytes


def _draining(scope) -> bool:
    engine = getattr(scope["app"].state, "engine", None) if "app" in scope else None
    return engine is not None and engine.draining


def route_path(scope) -> str:
    """The path the router matches: without the root path a proxy may mount the app under."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path
