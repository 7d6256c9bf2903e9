"""The HTTP server: uvicorn, with the socket limits a public server needs.

uvicorn (h11) closes idle keep-alive connections, but it has no time limit on a
request's headers or body and no bound on open connections: sockets that send
a request line and then trickle headers or a body ("slowloris") stay open for
ever, and a thousand of them use up the process's file descriptors, after
which nothing answers. `GuardedH11Protocol` adds the three; `server_config`
sets them, and uvicorn's own keep-alive timeout and header size limit, from
the settings.

At the bound, a newcomer is not simply refused: that would let slow clients
lock out fast ones for as long as they keep trickling. Instead the server
closes another open connection to make room (`_make_room`): the one that has
spent longest on its request line and headers, else an idle kept-alive one. A
well-formed request then gets in however many slow ones there are, and its
kept-alive connection outlives theirs; only when every open connection is busy
(a request body being read, a request being served) is the newcomer refused.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from functools import partial

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.settings import Settings

log = logging.getLogger(__name__)

RESERVED_FDS = 128  # files the process needs besides client sockets: model, store, logs, Redis


def _answer(status: str, text: str) -> bytes:
    body = text.encode()
    head = f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
    return (head + "connection: close\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus:
    - a header timeout: a request whose request line and headers are not all in
      within header_timeout_s (counted from the connection, or from the first
      byte of a next request on a kept-alive connection) is answered 408 and its
      connection closed;
    - a body timeout: a request whose body stops arriving for body_timeout_s
      (between two pieces of it, as nginx's client_body_timeout) likewise;
    - a connection bound: when a new connection would make more than
      max_connections open ones, another is closed to make room for it
      (`_make_room`): the one whose request line and headers began longest
      ago (answered 503), else an idle kept-alive one (closed silently, as the
      keep-alive timeout would). If every other connection is reading a
      request body or serving a request, the newcomer is answered 503 and
      closed at once instead. Either way a descriptor is free again."""

    def __init__(self, *args, header_timeout_s: float, body_timeout_s: float, max_connections: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_connections = max_connections
        self.read_timer: asyncio.TimerHandle | None = None  # the header or the body timer, whichever runs
        self.headers_since: float | None = None  # when the current request line + headers began; None outside them

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._make_room():
            self.logger.warning("refused a connection: %d are open (limit %d), none idle or sending headers",
                                len(self.connections), self.max_connections)  # fmt: skip
            transport.write(_answer("503 Service Unavailable", "too many open connections; try again later\n"))
            transport.close()
            return
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.read_timer is None and self.conn.their_state is h11.IDLE:  # a next request on a kept-alive connection
            self._start_header_timer()
        super().data_received(data)
        if self.conn.their_state is h11.SEND_BODY:  # headers in, body coming: an idle timer, restarted per piece
            self._stop_read_timer()
            self._start_read_timer(self.body_timeout_s, f"no request body data for {self.body_timeout_s} s")
        elif self.conn.their_state is not h11.IDLE:  # the whole request is in
            self._stop_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_read_timer()
        super().connection_lost(exc)

    def _make_room(self) -> bool:
        """Close another open connection, so that this new one may stay: the
        one whose request line and headers began longest ago (a slow client, or
        a slowloris), else an idle kept-alive one (its client has sent whole
        requests, and loses none: any client must expect the server to close
        an idle connection). False when there is none: every other connection
        is reading a request body or serving a request."""
        victim, victim_rank = None, None
        for other in self.connections:
            if other is self or not isinstance(other, GuardedH11Protocol) or other.transport.is_closing():
                continue
            if other.headers_since is not None:
                rank = (0, other.headers_since)
            elif other.timeout_keep_alive_task is not None:  # idle between requests (uvicorn's keep-alive timer runs)
                rank = (1, 0.0)
            else:
                continue
            if victim_rank is None or rank < victim_rank:
                victim, victim_rank = other, rank
        if victim is None:
            return False
        if victim.headers_since is not None:
            waited = time.monotonic() - victim.headers_since
            self.logger.warning("closed the connection longest in its headers (%.1f s) for a new one: %d are open "
                                "(limit %d)", waited, len(self.connections), self.max_connections)  # fmt: skip
            why = "too many open connections: closed to make room, as the slowest to send its request headers"
            victim.transport.write(_answer("503 Service Unavailable", why + "; try again later\n"))
        else:
            self.logger.info("closed an idle kept-alive connection for a new one: %d are open (limit %d)",
                             len(self.connections), self.max_connections)  # fmt: skip
        if victim.transport.get_write_buffer_size():  # it does not read what it is sent: drop it now
            victim.transport.abort()
        else:
            victim.transport.close()
        return True

    def _start_header_timer(self) -> None:
        self._start_read_timer(self.header_timeout_s, f"request headers took longer than {self.header_timeout_s} s")
        self.headers_since = time.monotonic()

    def _start_read_timer(self, seconds: float, why: str) -> None:
        self.read_timer = self.loop.call_later(seconds, self._read_timeout, why)

    def _stop_read_timer(self) -> None:
        self.headers_since = None
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None

    def _read_timeout(self, why: str) -> None:
        self.read_timer = None
        self.headers_since = None
        if not self.transport.is_closing():
            self.transport.write(_answer("408 Request Timeout", why + "\n"))
            self.transport.close()


def connection_bound(max_connections: int) -> int:
    """max_connections, lowered to fit the process's open-file limit (less what
    the process needs besides sockets), so that the bound is reached before EMFILE."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or max_connections <= soft - RESERVED_FDS:
        return max_connections
    fitted = max(1, soft - RESERVED_FDS)
    log.warning("max_connections %d does not fit the open-file limit (ulimit -n %d): using %d",
                max_connections, soft, fitted)  # fmt: skip
    return fitted


# after the drain (server/api/shutdown.py) has answered every request the engine held, how long uvicorn
# waits for the other ones (an upload mid-body, an answer still being written) before it cancels them
SHUTDOWN_TAIL_S = 5.0


def server_config(app, settings: Settings) -> uvicorn.Config:
    protocol = partial(GuardedH11Protocol, header_timeout_s=settings.header_timeout_s,
                       body_timeout_s=settings.body_timeout_s,
                       max_connections=connection_bound(settings.max_connections))  # fmt: skip
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, http=protocol,
        timeout_keep_alive=settings.keep_alive_timeout_s, h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_graceful_shutdown=SHUTDOWN_TAIL_S,
    )  # fmt: skip
