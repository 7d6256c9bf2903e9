"""Task identities a replica answers from memory, kept right by a Redis channel.

Why: every request used to cost one HMGET (version + digest) before it could
run. Now each write script (put, delete) also PUBLISHes the task id on
`{prefix}:changed`, inside the same script, and the writer answers its caller
only after a PING on the same connection came back, i.e. after Redis has
written the message to every subscriber's socket (redis_store.py says why the
PING is needed). Each replica holds one subscribed connection and drops a
task's remembered identity when its id arrives; a lookup that finds an
identity in memory sends nothing to Redis.

Why a channel and not Redis client-side caching (`CLIENT TRACKING`, redis-py
5.1+ `Redis(protocol=3, cache_config=CacheConfig())`; 8.1 is installed):
tracking is switched on where the client is built (which the Sentinel work
owns), it caches every read command of that client, not just the identity,
and its invalidations arrive on whichever pooled connection made the read,
with no way to ask "has every invalidation sent until now been read?". The
channel needs only PUBLISH and SUBSCRIBE on one extra connection taken from
the store's own pool, leaves every read as it was, and, with a PING on that
connection, answers exactly that question: Redis answers a PING after every
message it published before the PING, on that connection, in order.

The rule, and what it guarantees. A remembered identity is used only while
 1. the subscription is up: lost, (re)connecting or never confirmed, every
    lookup is an HMGET and nothing is remembered, and what was remembered is
    forgotten the moment the connection is found broken;
 2. it is confirmed recently: a PONG has been read for a PING sent at most
    `max_lag` seconds ago (PINGs go out every `max_lag / 5`). So every write
    Redis finished before that PING was sent has been read and applied;
 3. the lookup first reads, without waiting, everything already on the
    subscriber socket (a poll, no round trip) and applies it.
Hence, for a write through ANOTHER replica:
 - one that finished more than `max_lag` before the lookup is always seen (by
   2, whatever the network or the other threads do; otherwise the lookup pays
   an HMGET);
 - one that finished within the last `max_lag` is seen when its message has
   reached this host by the time of the lookup (3). Redis has written it
   before the writer answered, and the client must get that answer and send a
   new request before the lookup. On one host (loopback) the bytes are then
   already in this replica's socket, so it is seen; across a network it is
   seen unless the packet from Redis to this replica is slower than the whole
   chain Redis -> writer -> client -> this replica. TCP promises no order
   between two connections, so that last case is not excluded: then one
   lookup may return the previous identity, for at most `max_lag` seconds.
A write through THIS replica is always seen (the store forgets the task's
identity itself when the write returns). `max_lag=0` turns all of this off:
one HMGET per lookup, the exact guarantee for every write.

Not announced: changes made behind ptserve's back (FLUSHDB, DEL or HSET by
hand). A Redis restart drops the connection, so it is noticed (rule 1);
anything else is seen when that task is next written through ptserve or the
subscription reconnects.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import redis

from .store import PromptIdentity

log = logging.getLogger(__name__)

_MAX_REMEMBERED = 65536  # identities; when full, start again (a miss costs one HMGET)


class IdentityWatcher:
    """Remembered task identities (None: the task does not exist) and the one
    subscribed connection that invalidates them. Thread-safe."""

    def __init__(self, pool: redis.ConnectionPool, channel: str, max_lag: float):
        self._pool = pool
        self.channel = channel
        self.max_lag = max_lag  # seconds a confirmation stays good; the staleness bound above
        self.heartbeat = max_lag / 5  # seconds between PINGs on the subscriber connection
        self._lock = threading.Lock()
        self._conn = None  # the subscribed connection, None while down
        self._identities: dict[str, PromptIdentity | None] = {}
        self._epoch = 0  # bumped on every invalidation and on down/up: an HMGET that spans one is not remembered
        self._confirmed_at: float | None = None  # send time of the newest PING whose PONG was read
        self._last_ping = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self.subscriptions = 0  # connections subscribed so far (the first one included)

    # --- the request path ------------------------------------------------------

    def lookup(self, task_id: str) -> tuple[bool, PromptIdentity | None, int | None]:
        """(found, identity, ticket). Not found: read the store, then hand the
        ticket to `remember` (None when nothing may be remembered now)."""
        self._ensure_running()
        with self._lock:
            if self._conn is None:
                return False, None, None
            self._drain()  # rule 3; may find the connection broken
            if self._conn is None:
                return False, None, None
            fresh = self._confirmed_at is not None and time.monotonic() - self._confirmed_at <= self.max_lag
            if fresh and task_id in self._identities:
                return True, self._identities[task_id], None
            return False, None, self._epoch

    def remember(self, task_id: str, identity: PromptIdentity | None, ticket: int | None) -> None:
        """Keep what an HMGET read, unless an invalidation or a reconnection
        came in while it ran (it may predate the write that message announced)."""
        with self._lock:
            if ticket is None or ticket != self._epoch or self._conn is None:
                return
            if len(self._identities) >= _MAX_REMEMBERED:
                self._identities.clear()
            self._identities[task_id] = identity

    def forget(self, task_id: str) -> None:
        """This process wrote the task: its next lookup reads the store."""
        with self._lock:
            self._identities.pop(task_id, None)
            self._epoch += 1

    # --- the subscriber connection --------------------------------------------

    def _drain(self) -> None:
        """Apply every message already received, and PING when one is due.
        Never waits for the network. Call with the lock held."""
        conn = self._conn
        try:
            while conn.can_read(timeout=0):
                self._apply(conn.read_response(push_request=True))
            now = time.monotonic()
            if now - self._last_ping >= self.heartbeat:
                conn.send_command("PING", repr(now))
                self._last_ping = now
        except (redis.RedisError, OSError) as e:
            self._down(e)

    def _apply(self, reply) -> None:
        # RESP2: [b"message", channel, task id] and [b"pong", stamp];
        # RESP3 (redis-py's default since 8): the same message as a push, and the bare stamp
        if isinstance(reply, list) and reply[0] == b"message":
            self._identities.pop(reply[2].decode(), None)
            self._epoch += 1
        elif isinstance(reply, list) and reply[0] == b"pong":
            self._confirmed_at = float(reply[1])  # replies come in order: the newest so far
        elif isinstance(reply, bytes):
            self._confirmed_at = float(reply)

    def _down(self, error: Exception) -> None:
        log.warning("prompt store (Redis): invalidation channel lost (%s); reading identities from Redis", error)
        conn, self._conn = self._conn, None
        self._identities.clear()
        self._confirmed_at = None
        self._epoch += 1
        if conn is not None:
            conn.disconnect()
            self._pool.release(conn)

    def _connect(self) -> None:
        conn = self._pool.get_connection()
        try:
            conn.send_command("SUBSCRIBE", self.channel)
            reply = conn.read_response(push_request=True)  # [b"subscribe", channel, 1]: from now on, every message
            if not isinstance(reply, list) or reply[0] != b"subscribe":
                raise redis.ConnectionError(f"unexpected answer to SUBSCRIBE: {reply[0]!r}")
        except BaseException:
            conn.disconnect()
            self._pool.release(conn)
            raise
        with self._lock:
            self._conn = conn
            self._identities.clear()
            self._confirmed_at = None  # nothing is used before the first PONG
            self._last_ping = 0.0
            self._epoch += 1
            self._drain()  # sends the first PING

    def _run(self) -> None:
        backoff = self.heartbeat
        while not self._stop.is_set():
            if self._conn is None:
                try:
                    self._connect()
                    self.subscriptions += 1
                    backoff = self.heartbeat
                except (redis.RedisError, OSError) as e:
                    log.debug("prompt store (Redis): subscribing failed: %s", e)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
            with self._lock:
                if self._conn is not None:
                    self._drain()
            self._stop.wait(self.heartbeat)

    def _ensure_running(self) -> None:
        if self._pid != os.getpid():  # a forked child: the parent's socket and thread are not ours
            self._pid, self._conn, self._thread, self._lock = os.getpid(), None, None, threading.Lock()
            self._identities.clear()
            self._confirmed_at = None
            self._epoch += 1
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="ptserve-invalidation", daemon=True)
                    self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                conn.disconnect()
                self._pool.release(conn)
