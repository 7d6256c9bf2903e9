"""The request gate: tokens and body sizes are checked from the headers, before
any byte of a body is read; over real HTTP on loopback."""

import select
import socket
from collections.abc import Iterator

import httpx
import pytest

from prompt_store.artifact import artifact_bytes
from server.api.app import create_app
from server.api.request_gate import UPLOAD_SLACK
from server.settings import Settings
from tests.helpers import LiveServer, random_prompt

WRITE, INFERENCE = "w-secret", "i-secret"
PIECE = 64 * 1024


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    from ptcore.model import load_model

    return load_model(str(gpt2_dir), device="cpu", dtype="float32")


class CountingApp:
    """The app, counting the body bytes it is handed, one entry per receive()."""

    def __init__(self, app):
        self.app = app
        self.state = app.state
        self.pieces: list[int] = []

    async def __call__(self, scope, receive, send):
        async def counted():
            message = await receive()
            if message["type"] == "http.request" and scope["path"] != "/health":
                self.pieces.append(len(message.get("body", b"")))
            return message

        await self.app(scope, counted, send)


def serve(loaded, tmp_path, **settings):
    s = Settings(model=loaded.info["name_or_path"], store=str(tmp_path / "store"), **settings)
    counting = CountingApp(create_app(s, loaded))
    return LiveServer(counting), counting


def chunked(total: int) -> Iterator[bytes]:
    """`total` bytes of a multipart PEFT upload that never ends, as HTTP chunks of PIECE bytes."""
    head = b'--b\r\nContent-Disposition: form-data; name="adapter_model"; filename="m"\r\n\r\n'
    data = head + b"x" * (total - len(head))
    for i in range(0, total, PIECE):
        piece = data[i : i + PIECE]
        yield b"%x\r\n%s\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


def send_until_answered(port: int, head: str, body: Iterator[bytes]) -> tuple[int, int]:
    """Sends the request head, gives the server 1 s to answer from it alone, then
    sends body pieces for as long as no answer has come. Returns (status, body
    bytes sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        sent, wait = 0, 1.0
        for piece in body:
            if select.select([s], [], [], wait)[0]:
                break  # answered
            wait = 0
            try:
                s.sendall(piece)
            except OSError:  # the server closed the connection: its answer is waiting
                break
            sent += len(piece)
        answer = b""
        while b"\r\n" not in answer:
            more = s.recv(4096)
            if not more:
                break
            answer += more
        return int(answer.split(b" ")[1]), sent


def test_tokens_are_checked_before_the_body_is_read(gpt2, tmp_path):
    live, app = serve(gpt2, tmp_path, api_token=WRITE, inference_token=INFERENCE)
    with live:
        for method, path, auth in (
            ("PUT", "/v1/tasks/t/peft", ""),  # no token
            ("PUT", "/v1/tasks/t/peft", f"Bearer {INFERENCE}"),  # the wrong kind of token
            ("PUT", "/v1/tasks/t", "Bearer wrong"),
            ("POST", "/v1/tasks/t/generate", f"Bearer {WRITE}"),
        ):
            header = f"authorization: {auth}\n" if auth else ""
            head = f"{method} {path} HTTP/1.1\nhost: x\n{header}content-type: multipart/form-data; boundary=b\n" \
                   "transfer-encoding: chunked\n"  # fmt: skip
            status, sent = send_until_answered(live.port, head, chunked(8 * 1024 * 1024))
            expected = 403 if auth == f"Bearer {INFERENCE}" else 401
            assert (status, sent, sum(app.pieces)) == (expected, 0, 0), (method, path, auth)


def test_a_declared_oversize_body_is_refused_before_it_is_read(gpt2, tmp_path):
    limit = 64 * 1024
    live, app = serve(gpt2, tmp_path, api_token=WRITE, max_artifact_bytes=limit, max_json_bytes=limit)
    with live:
        for method, path, length in (
            ("PUT", "/v1/tasks/t/peft", 2 * limit + UPLOAD_SLACK + 1),
            ("PUT", "/v1/tasks/t", limit + 1),
            ("POST", "/v1/tasks/t/generate", limit + 1),
        ):
            head = f"{method} {path} HTTP/1.1\nhost: x\nauthorization: Bearer {WRITE}\ncontent-length: {length}\n"
            status, sent = send_until_answered(live.port, head, iter([b"x" * PIECE] * (length // PIECE + 1)))
            assert (status, sent, sum(app.pieces)) == (413, 0, 0), path


def test_a_chunked_oversize_upload_is_refused_at_the_limit(gpt2, tmp_path):
    limit = 64 * 1024
    peft_limit = 2 * limit + UPLOAD_SLACK
    live, app = serve(gpt2, tmp_path, api_token=WRITE, max_artifact_bytes=limit)
    with live:
        head = f"PUT /v1/tasks/t/peft HTTP/1.1\nhost: x\nauthorization: Bearer {WRITE}\n" \
               "content-type: multipart/form-data; boundary=b\ntransfer-encoding: chunked\n"  # fmt: skip
        status, sent = send_until_answered(live.port, head, chunked(8 * 1024 * 1024))
        assert status == 413
        # it stopped with the piece that crossed the limit
        assert sum(app.pieces[:-1]) <= peft_limit < sum(app.pieces), app.pieces
        assert sent < 8 * 1024 * 1024  # and the connection was closed, not drained


def test_two_authorization_headers_are_refused(gpt2, tmp_path):
    data = artifact_bytes(random_prompt(gpt2, "[P:2]{input}"))
    live, _ = serve(gpt2, tmp_path, api_token=WRITE)
    with live, httpx.Client(base_url=live.url, timeout=60) as c:
        good, bad = ("Authorization", f"Bearer {WRITE}"), ("Authorization", "Bearer wrong")
        for headers in ([good, bad], [bad, good]):
            r = c.put("/v1/tasks/t", content=data, headers=headers)
            assert r.status_code == 400, headers
            assert r.json()["detail"] == "the request has 2 Authorization headers; send exactly one"
        assert c.get("/v1/tasks/t").status_code == 404  # nothing was written
        assert c.put("/v1/tasks/t", content=data, headers=[good]).status_code == 201


def test_downloading_an_artifact_needs_the_write_token(gpt2, tmp_path):
    data = artifact_bytes(random_prompt(gpt2, "[P:2]{input}"))
    live, _ = serve(gpt2, tmp_path, api_token=WRITE, inference_token=INFERENCE)
    with live, httpx.Client(base_url=live.url, timeout=60) as c:
        assert c.put("/v1/tasks/t", content=data, headers={"Authorization": f"Bearer {WRITE}"}).status_code == 201
        assert c.get("/v1/tasks/t/artifact").status_code == 401
        r = c.get("/v1/tasks/t/artifact", headers={"Authorization": f"Bearer {INFERENCE}"})
        assert r.status_code == 403 and "PTSERVE_API_TOKEN" in r.json()["detail"]
        r = c.get("/v1/tasks/t/artifact", headers={"Authorization": f"Bearer {WRITE}"})
        assert r.status_code == 200 and r.content == data
        assert c.get("/v1/tasks/t").status_code == 200  # the summary stays open


def test_every_route_that_writes_or_runs_the_model_needs_a_token(gpt2, tmp_path):
    """A new route is open only if it is listed here as open on purpose."""
    from server.api.access import POLICY

    open_paths = ("/health", "/ready", "/metrics", "/v1/stats", "/v1/tasks", "/v1/tasks/{task_id}",
                  "/v1/tasks/{task_id}/versions")  # fmt: skip
    open_routes = {("GET", path) for path in open_paths}
    app = create_app(Settings(model=gpt2.info["name_or_path"], store=str(tmp_path)), gpt2)
    routes = {(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops}
    assert routes - open_routes == set(POLICY)


def test_headers_over_the_limit_are_refused_even_when_sent_at_once(gpt2, tmp_path):
    """h11 bounds headers only while they arrive in pieces; the gate bounds them all."""
    live, _ = serve(gpt2, tmp_path, max_header_bytes=16 * 1024)
    with live, socket.create_connection(("127.0.0.1", live.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            more = s.recv(4096)
            if not more:
                break
            answer += more
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"the limit is 16384" in answer


def test_the_policy_matches_the_path_the_router_sees_under_a_root_path():
    from server.api.request_gate import route_path

    assert route_path({"path": "/api/v1/tasks/t", "root_path": "/api"}) == "/v1/tasks/t"
    assert route_path({"path": "/v1/tasks/t", "root_path": ""}) == "/v1/tasks/t"
