"""Socket limits of the HTTP server (server/api/http_server.py), with real sockets on loopback."""

import socket
import time

import httpx

from tests.helpers import live_server


def serve(loaded, tmp_path, **settings):
    return live_server(loaded, str(tmp_path / "store"), **settings)


def closed_by_server(sock: socket.socket) -> bytes | None:
    """What the server sent before closing, or None if it is still open."""
    sock.setblocking(False)
    try:
        data = sock.recv(4096)
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return b""
    if not data:
        return b""
    sock.setblocking(True)
    sock.settimeout(1)
    rest = sock.recv(4096)
    while rest:
        data += rest
        rest = sock.recv(4096)
    return data


def health_on(sock: socket.socket) -> bytes:
    """Asks for /health on an open connection; the whole answer."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while not answer.endswith(b'{"status":"ok"}'):
        answer += sock.recv(4096)
    return answer


def test_slow_headers_are_timed_out_while_health_answers(gpt2, tmp_path):
    timeout = 1.0
    with serve(gpt2, tmp_path, header_timeout_s=timeout) as live, httpx.Client(base_url=live.url, timeout=5) as c:
        slow = [socket.create_connection(("127.0.0.1", live.port), timeout=5) for _ in range(50)]
        start = time.monotonic()
        for s in slow:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        answers: dict[int, bytes] = {}
        while len(answers) < len(slow) and time.monotonic() - start < timeout + 3:
            for i, s in enumerate(slow):
                if i in answers:
                    continue
                answer = closed_by_server(s)
                if answer is None:
                    try:
                        s.sendall(b"X-Slow: 1\r\n")  # one more header line, never the blank line
                    except OSError:
                        answers[i] = b""
                else:
                    answers[i] = answer
            assert c.get("/health").status_code == 200
            time.sleep(0.2)
        elapsed = time.monotonic() - start
        for s in slow:
            s.close()
        still_open = len(slow) - len(answers)
        assert still_open == 0, f"{still_open} slow connections still open after {elapsed:.1f} s"
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers.values()), set(answers.values())
        assert elapsed >= timeout

        # on a kept-alive connection, the next request's headers have the same time limit
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as s:
            assert health_on(s).startswith(b"HTTP/1.1 200 ")
            s.sendall(b"GET /health HTTP/1.1\r\n")
            start = time.monotonic()
            while (answer := closed_by_server(s)) is None and time.monotonic() - start < timeout + 3:
                s.sendall(b"X-Slow: 1\r\n")
                time.sleep(0.2)
            assert answer is not None and answer.startswith(b"HTTP/1.1 408 ")


def test_connections_beyond_the_bound_are_refused_and_idle_ones_closed(gpt2, tmp_path):
    with serve(gpt2, tmp_path, max_connections=20, keep_alive_timeout_s=0.5) as live:
        held = [socket.create_connection(("127.0.0.1", live.port), timeout=5) for _ in range(20)]
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as extra:
            assert extra.recv(4096).startswith(b"HTTP/1.1 503 ")
            assert extra.recv(4096) == b""  # and closed
        for s in held:
            s.close()
        time.sleep(0.2)
        assert httpx.get(f"{live.url}/health").status_code == 200

        # an idle kept-alive connection is closed after keep_alive_timeout_s
        with socket.create_connection(("127.0.0.1", live.port), timeout=5) as s:
            assert health_on(s).startswith(b"HTTP/1.1 200 ")
            start = time.monotonic()
            assert s.recv(4096) == b""
            assert 0.3 < time.monotonic() - start < 2


def test_a_body_that_stops_arriving_is_timed_out(gpt2, tmp_path):
    """Headers in, then the body trickles and stops: 408 after body_timeout_s of
    silence, while a body that keeps coming in small pieces is not cut off."""
    with serve(gpt2, tmp_path, body_timeout_s=1.0) as live, httpx.Client(base_url=live.url, timeout=5) as c:
        head = b"PUT /v1/tasks/t HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        stalled = socket.create_connection(("127.0.0.1", live.port), timeout=5)
        steady = socket.create_connection(("127.0.0.1", live.port), timeout=5)
        stalled.sendall(head + b"x")
        steady.sendall(head + b"x")
        start = time.monotonic()
        answer = None
        while answer is None and time.monotonic() - start < 4:
            steady.sendall(b"x")  # a piece every 0.25 s: never 1 s of silence
            assert c.get("/health").status_code == 200
            time.sleep(0.25)
            answer = closed_by_server(stalled)
        elapsed = time.monotonic() - start
        assert answer is not None and answer.startswith(b"HTTP/1.1 408 ")
        assert b"no request body data for 1.0 s" in answer
        assert 0.9 <= elapsed <= 2.5
        assert closed_by_server(steady) is None  # still open, still sending
        stalled.close()
        steady.close()
