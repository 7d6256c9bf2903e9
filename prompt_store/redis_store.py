"""The shared store: Redis (redis-py), for several servers or docker-compose.

Keys, under a prefix (default `ptserve`):
- `{p}:task:{id}`    hash {version, digest, artifact, summary, kept}: the latest
                     version, and `kept`, the older versions kept (newest
                     first, comma-separated), each as fields `v{N}:digest`,
                     `v{N}:artifact`, `v{N}:summary`: one key holds the whole
                     task, so a delete is one DEL;
- `{p}:version:{id}` counter of versions ever given (kept after a delete);
- `{p}:tasks`        set of task ids that exist;
- `{p}:changed`      a channel: each put that makes a version, and each
                     delete, publishes the task id (see redis_invalidation).
A put is one Lua script (bump counter + move the latest to the kept fields +
write hash + add to set), so concurrent puts from many servers get distinct
versions and the hash always holds the highest one. The script is declared with a shebang, so Redis refuses it whole
when out of memory instead of failing halfway, and it makes no new version when
the hash already holds the same bytes (digest).

A write is sent once, never retried by redis-py, and its errors say whether it
can have happened: a failure before the script was sent (connect, the PING
that checks the connection, writing the command) stored nothing
(StoreUnavailable, 503); no answer after it was sent means Redis may still run
it (StoreOutcomeUnknown, 504), and sending the same bytes again is safe.
"""

from __future__ import annotations

import json
import logging

import redis

from .artifact import read_header, summarize
from .errors import StoreOutcomeUnknown, StoreUnavailable
from .redis_backoff import Backoff
from .redis_connect import connect
from .redis_invalidation import IdentityWatcher
from .store import (
    DEFAULT_KEEP_VERSIONS,
    PromptIdentity,
    PromptStore,
    StoredPrompt,
    check_keep_versions,
    check_task_id,
    digest_of,
)

log = logging.getLogger(__name__)

# KEYS: counter, task hash, task set; ARGV: artifact, summary, task id, digest, channel, versions to keep
_PUT = """#!lua
local h = KEYS[2]
local same = redis.call('HMGET', h, 'version', 'digest', 'artifact')
if (not same[2] or same[2] == '' or same[2] == ARGV[4]) and same[3] == ARGV[1] then  -- the bytes decide:
  -- a damaged copy is replaced; '' or no digest: a record from before digests were stored
  return tonumber(same[1])
end
local v = redis.call('INCR', KEYS[1])
local old = redis.call('HMGET', h, 'version', 'digest', 'artifact', 'summary', 'kept')
local kept = {}
if old[5] then
  for n in string.gmatch(old[5], '%d+') do table.insert(kept, n) end
end
local older = tonumber(ARGV[6]) - 1
if old[1] and older > 0 then
  local p = 'v' .. old[1] .. ':'
  redis.call('HSET', h, p .. 'digest', old[2] or '', p .. 'artifact', old[3], p .. 'summary', old[4])
  table.insert(kept, 1, old[1])
end
while #kept > older do
  local p = 'v' .. table.remove(kept) .. ':'
  redis.call('HDEL', h, p .. 'digest', p .. 'artifact', p .. 'summary')
end
redis.call('HSET', h, 'version', v, 'digest', ARGV[4], 'artifact', ARGV[1], 'summary', ARGV[2],
           'kept', table.concat(kept, ','))
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('PUBLISH', ARGV[5], ARGV[3])
return v
"""

# KEYS: task hash, task set; ARGV: task id, channel. allow-oom: a Redis over its maxmemory refuses every
# script that may use memory, but a delete is what frees it
_DELETE = """#!lua flags=allow-oom
local n = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[1])
return n
"""


# KEYS: task hash; ARGV: version, "1" to include the artifact. -> {version, digest, artifact?}, or nil
# when the task does not keep that version. A digest is false in records written before digests were
_READ_VERSION = """#!lua flags=no-writes
local h = KEYS[1]
local latest = redis.call('HGET', h, 'version')
if not latest then return false end
local p = ''
if latest ~= ARGV[1] then p = 'v' .. ARGV[1] .. ':' end
local found = redis.call('HMGET', h, p .. 'digest', p .. (ARGV[2] == '1' and 'artifact' or 'digest'))
if p ~= '' and not found[1] then return false end
if ARGV[2] ~= '1' then found[2] = false end
return {ARGV[1], found[1], found[2]}
"""


# KEYS: task hash, task set; ARGV: version, task id, channel. -> 1, or 0 when that version is not kept.
# The latest's removal makes the newest kept one the latest; the only one's, deletes the task. allow-oom: it frees.
_DROP_VERSION = """#!lua flags=allow-oom
local h = KEYS[1]
local fields = redis.call('HMGET', h, 'version', 'kept')
if not fields[1] then return 0 end
local kept = {}
if fields[2] then
  for n in string.gmatch(fields[2], '%d+') do table.insert(kept, n) end
end
if fields[1] == ARGV[1] then
  if #kept == 0 then
    redis.call('DEL', h)
    redis.call('SREM', KEYS[2], ARGV[2])
  else
    local p = 'v' .. table.remove(kept, 1) .. ':'
    local older = redis.call('HMGET', h, p .. 'digest', p .. 'artifact', p .. 'summary')
    redis.call('HSET', h, 'version', string.sub(p, 2, -2), 'digest', older[1], 'artifact', older[2],
               'summary', older[3], 'kept', table.concat(kept, ','))
    redis.call('HDEL', h, p .. 'digest', p .. 'artifact', p .. 'summary')
  end
else
  local found = false
  for i, n in ipairs(kept) do
    if n == ARGV[1] then table.remove(kept, i); found = true; break end
  end
  if not found then return 0 end
  local p = 'v' .. ARGV[1] .. ':'
  redis.call('HDEL', h, p .. 'digest', p .. 'artifact', p .. 'summary')
  redis.call('HSET', h, 'kept', table.concat(kept, ','))
end
redis.call('PUBLISH', ARGV[3], ARGV[2])
return 1
"""


OUT_OF_MEMORY = ("prompt store (Redis) is out of memory (its maxmemory): it refuses new prompts until memory "
                 "is freed; deleting tasks frees it, or raise maxmemory (docs/operations.md)")  # fmt: skip


def _unavailable(e: Exception) -> StoreUnavailable:
    # the client reads this: name the kind of failure, not addresses or socket paths
    log.error("prompt store (Redis): %s", e)
    if isinstance(e, redis.exceptions.OutOfMemoryError):
        return StoreUnavailable(OUT_OF_MEMORY)
    return StoreUnavailable(f"prompt store (Redis) is unreachable ({type(e).__name__}); the server log has details")


class RedisStore(PromptStore):
    def __init__(self, url: str, prefix: str = "ptserve", identity_max_lag: float = 0.5,
                 keep_versions: int = DEFAULT_KEEP_VERSIONS):  # fmt: skip
        """`url` may set `socket_timeout` / `socket_connect_timeout` (seconds, default 5).
        `identity_max_lag`: see redis_invalidation (the latest version's identity
        only); 0 reads every identity from Redis."""
        self.url = url
        self.prefix = prefix
        self.keep_versions = check_keep_versions(keep_versions)
        self._redis = connect(url, socket_timeout=5, socket_connect_timeout=5)
        self.backoff = Backoff(self._redis.ping)  # remembers that Redis is down (redis_backoff.py)
        self._watcher = (
            IdentityWatcher(self._redis.connection_pool, f"{prefix}:changed", identity_max_lag)
            if identity_max_lag > 0
            else None
        )

    def _error(self, e: redis.RedisError) -> StoreUnavailable:
        """The 503 for a failed call; one that got no answer starts the back-off."""
        self.backoff.failed(e)
        return _unavailable(e)

    def _read(self, call, *args):
        """One reading call to Redis, `call(*args)`: refused at once while Redis counts as down
        (redis_backoff.py); a failure is a 503."""
        self.backoff.check()
        try:
            return call(*args)
        except redis.RedisError as e:
            raise self._error(e) from None

    def _task_key(self, task_id: str) -> str:
        return f"{self.prefix}:task:{check_task_id(task_id)}"

    def _run_write(self, task_id: str, script: str, keys: list[str], args: list) -> int:
        """Run a write script once on one connection, telling apart a failure
        before it was sent (nothing happened) from one after (unknown)."""
        try:
            return self._send_write(script, keys, args)
        finally:  # done, failed or unknown: this process's next lookup reads Redis
            if self._watcher is not None:
                self._watcher.forget(task_id)

    def _send_write(self, script: str, keys: list[str], args: list) -> int:
        self.backoff.check()
        pool = self._redis.connection_pool
        try:
            conn = pool.get_connection()
        except redis.RedisError as e:
            raise self._error(e) from None
        try:
            try:  # nothing has been sent yet: every failure here stored nothing
                conn.send_command("PING")
                conn.read_response()
                conn.send_command("EVAL", script, len(keys), *keys, *args)
            except redis.RedisError as e:
                conn.disconnect()  # a half-written command is dropped with the connection
                raise self._error(e) from None
            try:
                result = int(conn.read_response())
            except redis.ResponseError as e:  # refused whole (e.g. out of memory): nothing stored
                raise self._error(e) from None
            except redis.RedisError as e:
                conn.disconnect()
                log.error("prompt store (Redis): no answer to a write: %s", e)
                self.backoff.failed(e)
                raise StoreOutcomeUnknown(
                    f"the prompt store (Redis) did not answer in time ({type(e).__name__}): the outcome is "
                    "unknown, the change may still be applied; repeating the same request is safe"
                ) from None
            self._flushed_to_subscribers(conn)
            return result
        finally:
            pool.release(conn)

    @staticmethod
    def _flushed_to_subscribers(conn) -> None:
        """Wait until Redis has written the script's PUBLISH to every subscriber.
        Redis answers the script before it writes the message (both leave in the
        same event-loop pass, the caller's answer first), so a client told "done"
        could otherwise reach another replica before its invalidation does. Redis
        reads this PING only in a later pass, after that pass wrote everything."""
        try:
            conn.send_command("PING")
            conn.read_response()
        except redis.RedisError as e:  # the write is done; only its invalidation may be late
            conn.disconnect()
            log.warning("prompt store (Redis): no answer to the PING after a write: %s", e)

    def put(self, task_id: str, data: bytes) -> dict:
        header = read_header(data)
        summary = summarize(task_id, 0, header)
        keys = [f"{self.prefix}:version:{check_task_id(task_id)}", self._task_key(task_id), f"{self.prefix}:tasks"]
        channel = f"{self.prefix}:changed"
        args = [data, json.dumps(summary), task_id, digest_of(data), channel, self.keep_versions]
        version = self._run_write(task_id, _PUT, keys, args)
        return {**summary, "version": version}

    def _hmget(self, task_id: str, *fields: str) -> list:
        return self._read(self._redis.hmget, self._task_key(task_id), fields)

    def _read_version(self, task_id: str, version: int, artifact: bool) -> list | None:
        """[version, digest or None, artifact or None] of a kept version, or None, in one call."""
        found = self._read(self._redis.eval, _READ_VERSION, 1, self._task_key(task_id), str(version),
                           "1" if artifact else "0")  # fmt: skip
        return found or None

    def get(self, task_id: str, version: int | None = None) -> StoredPrompt | None:
        if version is None:
            version, digest, data = self._hmget(task_id, "version", "digest", "artifact")
        else:
            version, digest, data = self._read_version(task_id, version, artifact=True) or (None, None, None)
        if version is None:
            return None
        return StoredPrompt(task_id, int(version), data, digest.decode() if digest else digest_of(data))

    def identity(self, task_id: str, version: int | None = None) -> PromptIdentity | None:
        """The latest's from memory while the invalidation channel allows it
        (redis_invalidation says when), else one HMGET; a kept version's, one
        script call."""
        check_task_id(task_id)
        if version is not None:
            found = self._read_version(task_id, version, artifact=False)
            if found is None:
                return None
            if not found[1]:  # written before digests were stored
                stored = self.get(task_id, version)
                return None if stored is None else stored.identity
            return PromptIdentity(version, found[1].decode())
        if self._watcher is None:
            return self._read_identity(task_id)
        found, identity, ticket = self._watcher.lookup(task_id)
        if found:
            return identity
        identity = self._read_identity(task_id)
        self._watcher.remember(task_id, identity, ticket)
        return identity

    def _read_identity(self, task_id: str) -> PromptIdentity | None:
        version, digest = self._hmget(task_id, "version", "digest")
        if version is None:
            return None
        if not digest:  # written before digests were stored (b"" once kept as an older version)
            stored = self.get(task_id)
            return None if stored is None else stored.identity
        return PromptIdentity(int(version), digest.decode())

    @staticmethod
    def _versions(version: bytes, kept: bytes | None) -> list[int]:
        """The kept versions, newest first, from a task hash's `version` and `kept` fields."""
        return [int(version), *(int(n) for n in (kept or b"").decode().split(",") if n)]

    def _summary(self, version: bytes, summary: bytes, kept: bytes | None) -> dict:
        return {**json.loads(summary), "version": int(version), "versions": self._versions(version, kept)}

    def summary(self, task_id: str) -> dict | None:
        version, summary, kept = self._hmget(task_id, "version", "summary", "kept")
        return None if version is None else self._summary(version, summary, kept)

    def versions(self, task_id: str) -> list[dict] | None:
        """Two reads: a version pushed out by a put in between is left out."""
        latest = self.summary(task_id)
        if latest is None:
            return None
        older = latest["versions"][1:]
        rows = self._hmget(task_id, *(f"v{n}:summary" for n in older)) if older else []
        latest = {k: v for k, v in latest.items() if k != "versions"}
        return [latest] + [{**json.loads(s), "version": n} for n, s in zip(older, rows) if s is not None]

    def list(self) -> list[dict]:
        pipe = self._redis.pipeline(transaction=False)
        for task_id in self.task_ids():
            pipe.hmget(self._task_key(task_id), ("version", "summary", "kept"))
        rows = self._read(pipe.execute)
        return [self._summary(*row) for row in rows if row[0] is not None]

    def delete(self, task_id: str) -> bool:
        keys = [self._task_key(task_id), f"{self.prefix}:tasks"]
        return bool(self._run_write(task_id, _DELETE, keys, [task_id, f"{self.prefix}:changed"]))

    def drop_version(self, task_id: str, version: int) -> bool:
        keys = [self._task_key(task_id), f"{self.prefix}:tasks"]
        return bool(self._run_write(task_id, _DROP_VERSION, keys, [str(version), task_id, f"{self.prefix}:changed"]))

    def task_ids(self) -> list[str]:
        return sorted(m.decode() for m in self._read(self._redis.smembers, f"{self.prefix}:tasks"))

    def kept_versions(self, task_id: str) -> list[int]:
        version, kept = self._hmget(task_id, "version", "kept")
        return [] if version is None else self._versions(version, kept)

    def ping(self) -> None:
        self._read(self._redis.ping)

    def close(self) -> None:
        self.backoff.close()
        if self._watcher is not None:
            self._watcher.close()
        self._redis.close()
