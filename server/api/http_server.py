"""The HTTP server: uvicorn, with the socket limits a public server needs.

uvicorn (h11) closes idle keep-alive connections, but it has no time limit on a
request's headers or body and no bound on open connections: sockets that send
a request line and then trickle headers or a body ("slowloris") stay open for
ever, and a thousand of them use up the process's file descriptors, after
which nothing answers. `GuardedH11Protocol` adds the three; `server_config`
sets them, and uvicorn's own keep-alive timeout and header size limit, from
the settings.
"""

from __future__ import annotations

import asyncio
import logging
import resource
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
    - a connection bound: a connection beyond max_connections open ones is
      answered 503 and closed at once, so that its descriptor is free again."""

    def __init__(self, *args, header_timeout_s: float, body_timeout_s: float, max_connections: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_connections = max_connections
        self.read_timer: asyncio.TimerHandle | None = None  # the header or the body timer, whichever runs

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.logger.warning("refused a connection: %d are open (limit %d)", len(self.connections),
                                self.max_connections)  # fmt: skip
            transport.write(_answer("503 Service Unavailable", "too many open connections; try again later\n"))
            transport.close()
            return
        self._start_read_timer(self.header_timeout_s, f"request headers took longer than {self.header_timeout_s} s")

    def data_received(self, data: bytes) -> None:
        if self.read_timer is None and self.conn.their_state is h11.IDLE:  # a next request on a kept-alive connection
            self._start_read_timer(self.header_timeout_s, f"request headers took longer than {self.header_timeout_s} s")
        super().data_received(data)
        if self.conn.their_state is h11.SEND_BODY:  # headers in, body coming: an idle timer, restarted per piece
            self._stop_read_timer()
            self._start_read_timer(self.body_timeout_s, f"no request body data for {self.body_timeout_s} s")
        elif self.conn.their_state is not h11.IDLE:  # the whole request is in
            self._stop_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_read_timer()
        super().connection_lost(exc)

    def _start_read_timer(self, seconds: float, why: str) -> None:
        self.read_timer = self.loop.call_later(seconds, self._read_timeout, why)

    def _stop_read_timer(self) -> None:
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None

    def _read_timeout(self, why: str) -> None:
        self.read_timer = None
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


def server_config(app, settings: Settings) -> uvicorn.Config:
    protocol = partial(GuardedH11Protocol, header_timeout_s=settings.header_timeout_s,
                       body_timeout_s=settings.body_timeout_s,
                       max_connections=connection_bound(settings.max_connections))  # fmt: skip
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, http=protocol,
        timeout_keep_alive=settings.keep_alive_timeout_s, h11_max_incomplete_event_size=settings.max_header_bytes,
    )  # fmt: skip
