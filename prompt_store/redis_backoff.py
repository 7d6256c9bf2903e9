"""Remembering that Redis is down, so that requests stop waiting for it.

Without this, every store call while Redis does not answer (stopped, a
network partition) waits out the socket timeout (5 s): a request for a task
whose prompt is cached waits 5 s before it is served from the cache, and
every other request waits 5 s for its 503.

After a call fails for want of an answer (a timeout, a refused or dropped
connection), Redis counts as down: every store call fails at once with
StoreUnavailable, none reaches Redis, and one probe thread PINGs Redis every
`interval_s` (default 1 s) until it answers. Then calls go to Redis again. So
after Redis comes back, the store answers again within about `interval_s`
(plus the PING's own time). Errors that Redis answered with (a refused
script, out of memory) say nothing about reachability and change nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from .errors import StoreUnavailable

log = logging.getLogger(__name__)
DEFAULT_INTERVAL_S = 1.0
UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)  # TimeoutError: socket timeouts
# ConnectionError subclasses that are Redis's answer (a wrong password, a missing permission), not silence
ANSWERED = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)


class Backoff:
    def __init__(self, ping: Callable[[], None], interval_s: float = DEFAULT_INTERVAL_S):
        """ping: one PING of Redis, raising a redis error when it gets no answer."""
        self._ping = ping
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._down = threading.Event()  # set while Redis counts as down
        self._stopped = threading.Event()
        self.refused = 0  # calls failed at once while Redis counted as down (for tests and /v1/stats)

    @property
    def down(self) -> bool:
        return self._down.is_set()

    def check(self) -> None:
        """Raise StoreUnavailable at once while Redis counts as down."""
        if self._down.is_set():
            with self._lock:
                self.refused += 1
            raise StoreUnavailable(
                f"prompt store (Redis) is unreachable: it did not answer, and is tried again every "
                f"{self.interval_s:g} s; the server log has details"
            )

    def failed(self, error: Exception) -> None:
        """A call failed with `error`: when Redis gave no answer, count it as down
        and start the probe (one at a time)."""
        if not isinstance(error, UNREACHABLE) or isinstance(error, ANSWERED):
            return
        with self._lock:
            if self._down.is_set() or self._stopped.is_set():
                return
            self._down.set()
        log.error("prompt store (Redis) did not answer (%s): calls fail at once; probing every %g s",
                  type(error).__name__, self.interval_s)  # fmt: skip
        threading.Thread(target=self._probe, name="ptserve-redis-probe", daemon=True).start()

    def _probe(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                self._ping()
            except Exception as e:  # any failure: probe again (an answer that refuses counts as an answer)
                if isinstance(e, ANSWERED):
                    log.error("prompt store (Redis) answers, refusing: %s", e)
                else:
                    log.debug("prompt store (Redis) probe: still no answer (%s)", type(e).__name__)
                    continue
            self._down.clear()
            log.warning("prompt store (Redis) answers again")
            return

    def close(self) -> None:
        self._stopped.set()
