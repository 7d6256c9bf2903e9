"""The HTTP server: uvicorn, with the socket limits a public server needs.

uvicorn (h11) closes idle keep-alive connections, but it has no time limit on a
request's headers and no bound on open connections: sockets that send a
request line and then trickle headers ("slowloris") stay open for ever, and a
thousand of them use up the process's file descriptors, after which nothing
answers. `GuardedH11Protocol` adds both; `server_config` sets them, and
uvicorn's own keep-alive timeout and header size limit, from the settings.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from functools import partial

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import Settings

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
    - a connection bound: a connection beyond max_connections open ones is
      answered 503 and closed at once, so that its descriptor is free again."""

    def __init__(self, *args, header_timeout_s: float, max_connections: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.logger.warning("refused a connection: %d are open (limit %d)", len(self.connections),
                                self.max_connections)  # fmt: skip
            transport.write(_answer("503 Service Unavailable", "too many open connections; try again later\n"))
            transport.close()
            return
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.header_timer is None and self.conn.their_state is h11.IDLE:
            self._start_header_timer()  # a next request begins on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._stop_header_timer()  # its request line and headers are in

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        self.header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _header_timeout(self) -> None:
        self.header_timer = None
        if not self.transport.is_closing():
            self.transport.write(_answer("408 Request Timeout", f"request headers took longer than "
                                         f"{self.header_timeout_s} s\n"))  # fmt: skip
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
                       max_connections=connection_bound(settings.max_connections))  # fmt: skip
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level, http=protocol,
        timeout_keep_alive=settings.keep_alive_timeout_s, h11_max_incomplete_event_size=settings.max_header_bytes,
    )  # fmt: skip
