"""Socket limits of the HTTP server (server/api/http_server.py), with real sockets on loopback.

No test bounds how long anything takes: a timeout the server enforces is
checked from below (it did not cut off earlier), and every wait has a deadline
(DEADLINE_S) far beyond what it should take, past which it fails saying what
it waited for."""

import socket
import time

import h11
import httpx

from prompt_store.artifact import artifact_bytes
from tests.helpers import live_server, random_prompt, wait_until

DEADLINE_S = 60.0


def serve(loaded, tmp_path, **settings):
    return live_server(loaded, str(tmp_path / "store"), **settings)


def connect(live) -> socket.socket:
    return socket.create_connection(("127.0.0.1", live.port), timeout=DEADLINE_S)


def still_open(sock: socket.socket) -> bool:
    """The server has sent nothing on this connection and not closed it."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
        return False  # an answer, or b"" (closed)
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
    finally:
        sock.settimeout(DEADLINE_S)


def answer_of(sock: socket.socket) -> bytes:
    """All the server sends on this connection until it closes it."""
    sock.settimeout(DEADLINE_S)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        message = f"waited {DEADLINE_S:g} s for the server to close a connection; it sent {data!r}"
        raise AssertionError(message) from None
    return data


def closed_by_server(sock: socket.socket) -> bytes | None:
    """What the server sent before closing the connection, or None while it has sent nothing."""
    return None if still_open(sock) else answer_of(sock)


def health_on(sock: socket.socket) -> bytes:
    """Asks for /health on an open connection; the whole answer."""
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while not answer.endswith(b'{"status":"ok"}'):
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection after {answer!r}"
        answer += chunk
    return answer


def server_connections(live) -> list:
    """The server's protocol objects, one per open connection (uvicorn's shared set)."""
    return list(live._server.server_state.connections)


def wait_for_connections(live, n: int) -> None:
    wait_until(lambda: len(server_connections(live)) == n, f"the server to hold {n} open connections",
               DEADLINE_S)  # fmt: skip


def start_slow(live) -> socket.socket:
    """A connection that has sent a request line and one header, and no end of
    headers; returned once the server has it, so that connections made one
    after another are open on the server in that order."""
    n = len(server_connections(live))
    sock = connect(live)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    wait_for_connections(live, n + 1)
    return sock


def trickle(socks: list[socket.socket]) -> None:
    """One more header line on each connection, never the blank line that ends them."""
    for s in socks:
        s.sendall(b"X-Slow: 1\r\n")


def test_slow_headers_are_timed_out_while_health_answers(gpt2, tmp_path):
    timeout = 1.0
    with (
        serve(gpt2, tmp_path, header_timeout_s=timeout) as live,
        httpx.Client(base_url=live.url, timeout=DEADLINE_S) as c,
    ):
        start = time.monotonic()  # before any connection: the server starts each one's timer later
        slow = [connect(live) for _ in range(50)]
        for s in slow:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        answers: dict[int, bytes] = {}
        closed_after: dict[int, float] = {}  # seconds from start to when the test saw the answer
        while len(answers) < len(slow):
            waited = time.monotonic() - start
            assert waited < DEADLINE_S, f"{len(slow) - len(answers)} slow connections still open after {waited:.0f} s"
            for i, s in enumerate(slow):
                if i in answers:
                    continue
                answer = closed_by_server(s)
                if answer is None:
                    trickle([s])
                else:
                    answers[i], closed_after[i] = answer, time.monotonic() - start
            assert c.get("/health").status_code == 200
            time.sleep(0.2)  # paces the trickle (a header line per connection and round), far below max_header_bytes
        for s in slow:
            s.close()
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers.values()), set(answers.values())
        assert min(closed_after.values()) >= timeout  # none was cut off early

        # on a kept-alive connection, the next request's headers have the same time limit
        with connect(live) as s:
            assert health_on(s).startswith(b"HTTP/1.1 200 ")
            start = time.monotonic()  # before its first byte: the server starts the timer later
            s.sendall(b"GET /health HTTP/1.1\r\n")
            while (answer := closed_by_server(s)) is None:
                waited = time.monotonic() - start
                assert waited < DEADLINE_S, f"the kept-alive connection's slow headers still open after {waited:.0f} s"
                trickle([s])
                time.sleep(0.2)  # paces the trickle
            assert answer.startswith(b"HTTP/1.1 408 ") and b"request headers took longer than 1.0 s" in answer
            assert time.monotonic() - start >= timeout


def test_at_the_bound_the_connection_longest_in_its_headers_makes_room(gpt2, tmp_path):
    """Slow clients do not lock out fast ones. With every connection taken by a
    client trickling its headers, a well-formed request still gets in, and
    answered: the server closes the slow connection that began its headers
    first (503) to make room. The others go on trickling, and the header
    timeout is 10 minutes away: only the bound's policy explains the answer."""
    bound = 20
    with serve(gpt2, tmp_path, max_connections=bound, header_timeout_s=600) as live:
        with httpx.Client(base_url=live.url, timeout=DEADLINE_S) as c:
            assert c.put("/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}"))).status_code == 201
            body = {"input": "x", "max_new_tokens": 4}
            expected = c.post("/v1/tasks/t/generate", json=body).json()  # the same request, without an attack
        wait_for_connections(live, 0)

        slow = [start_slow(live) for _ in range(bound)]  # slow[0] is the oldest
        trickle(slow)
        with httpx.Client(base_url=live.url, timeout=DEADLINE_S) as c:
            r = c.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        assert not still_open(slow[0]), "the oldest slow connection was neither answered nor closed"
        victim = answer_of(slow[0])
        assert victim.startswith(b"HTTP/1.1 503 ") and b"slowest to send its request headers" in victim, victim
        assert [i for i, s in enumerate(slow) if still_open(s)] == list(range(1, bound))
        trickle(slow[1:])  # the attack goes on

        wait_for_connections(live, bound - 1)  # the health client left
        slow.append(start_slow(live))  # every connection is taken again
        trickle(slow[1:])
        with httpx.Client(base_url=live.url, timeout=DEADLINE_S) as c:
            r = c.post("/v1/tasks/t/generate", json=body)
        assert r.status_code == 200 and r.json() == expected
        assert not still_open(slow[1]), "the oldest slow connection left was neither answered nor closed"
        assert answer_of(slow[1]).startswith(b"HTTP/1.1 503 ")
        assert [i for i, s in enumerate(slow) if still_open(s)] == list(range(2, bound + 1))
        trickle(slow[2:])
        wait_for_connections(live, bound - 1)  # the generate client's close reached the server (a busy one is slow)
        assert all(p.conn.their_state is h11.IDLE for p in server_connections(live))  # all still in their headers
        for s in slow:
            s.close()


def test_at_the_bound_idle_kept_alive_connections_make_room_after_those_in_headers(gpt2, tmp_path):
    """A connection in its headers goes first, even a newer one: an idle
    kept-alive connection's client has sent whole requests. When none is in
    its headers, an idle one makes room, without a word: it has no request to
    answer."""
    bound = 20
    with serve(gpt2, tmp_path, max_connections=bound, header_timeout_s=600, keep_alive_timeout_s=600) as live:
        idle = [connect(live) for _ in range(bound // 2)]  # the older ones
        for s in idle:
            assert health_on(s).startswith(b"HTTP/1.1 200 ")
        wait_for_connections(live, len(idle))
        slow = [start_slow(live) for _ in range(bound - len(idle))]
        with connect(live) as newcomer:
            assert health_on(newcomer).startswith(b"HTTP/1.1 200 ")
        assert not still_open(slow[0]), "the oldest connection in its headers was neither answered nor closed"
        assert answer_of(slow[0]).startswith(b"HTTP/1.1 503 ")
        assert all(still_open(s) for s in idle + slow[1:])

        for s in slow[1:]:
            s.close()
        wait_for_connections(live, len(idle))
        idle += [connect(live) for _ in range(bound - len(idle))]
        for s in idle[bound // 2 :]:
            assert health_on(s).startswith(b"HTTP/1.1 200 ")
        wait_for_connections(live, bound)  # all idle
        with connect(live) as newcomer:
            assert health_on(newcomer).startswith(b"HTTP/1.1 200 ")
        closed = wait_until(lambda: [i for i, s in enumerate(idle) if not still_open(s)],
                            "the server to close an idle kept-alive connection", DEADLINE_S)  # fmt: skip
        assert len(closed) == 1, closed
        assert answer_of(idle[closed[0]]) == b""
        for s in idle + slow:
            s.close()


def test_at_the_bound_with_every_connection_busy_a_newcomer_is_refused(gpt2, tmp_path):
    """Connections whose request body is being read (or whose request is being
    served) are not closed to make room: the new connection is answered 503."""
    bound = 20
    with serve(gpt2, tmp_path, max_connections=bound, body_timeout_s=600) as live:
        busy = [connect(live) for _ in range(bound)]
        for s in busy:
            s.sendall(b"PUT /v1/tasks/t HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nx")
        wait_until(lambda: sum(p.conn.their_state is h11.SEND_BODY for p in server_connections(live)) == bound,
                   f"the server to read the bodies of {bound} requests", DEADLINE_S)  # fmt: skip
        with connect(live) as extra:
            answer = answer_of(extra)
        assert answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(b"too many open connections; try again later\n")
        assert all(still_open(s) for s in busy)
        for s in busy:
            s.close()
        wait_for_connections(live, 0)
        assert httpx.get(f"{live.url}/health", timeout=DEADLINE_S).status_code == 200


def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout(gpt2, tmp_path):
    timeout = 1.0
    with serve(gpt2, tmp_path, keep_alive_timeout_s=timeout) as live, connect(live) as s:
        start = time.monotonic()  # before the request: the server starts the timer once it has answered
        assert health_on(s).startswith(b"HTTP/1.1 200 ")
        assert answer_of(s) == b""  # closed, without a word
        assert time.monotonic() - start >= timeout


def test_a_body_that_stops_arriving_is_timed_out(gpt2, tmp_path):
    """Headers in, then the body trickles and stops: 408 after body_timeout_s of
    silence, while a body that keeps coming in small pieces is not cut off."""
    timeout = 2.0
    with (
        serve(gpt2, tmp_path, body_timeout_s=timeout) as live,
        httpx.Client(base_url=live.url, timeout=DEADLINE_S) as c,
    ):
        head = b"PUT /v1/tasks/t HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        stalled = connect(live)
        steady = connect(live)
        start = time.monotonic()  # before its last piece: the server starts the timer later
        stalled.sendall(head + b"x")
        steady.sendall(head + b"x")
        while (answer := closed_by_server(stalled)) is None:
            waited = time.monotonic() - start
            assert waited < DEADLINE_S, f"the stalled body still open after {waited:.0f} s"
            steady.sendall(b"x")
            assert c.get("/health").status_code == 200
            time.sleep(0.1)  # paces the steady body: a piece every 0.1 s, far from 2 s of silence
        assert answer.startswith(b"HTTP/1.1 408 ") and b"no request body data for 2.0 s" in answer, answer
        assert time.monotonic() - start >= timeout
        assert still_open(steady)  # still sending, not cut off
        stalled.close()
        steady.close()
