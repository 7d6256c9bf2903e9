"""The shared store: Redis (redis-py), for several servers or docker-compose.

Keys, under a prefix (default `ptserve`):
- `{p}:task:{id}`    hash {version, artifact, summary}: the latest version;
- `{p}:version:{id}` counter of versions ever given (kept after a delete);
- `{p}:tasks`        set of task ids that exist.
A put is one Lua script (bump counter + write hash + add to set), so concurrent
puts from many servers get distinct versions and the hash always holds the
highest one.
"""

from __future__ import annotations

import json

import redis

from .artifact import read_header, summarize
from .errors import StoreUnavailable
from .store import PromptStore, StoredPrompt, check_task_id

_PUT = """
local v = redis.call('INCR', KEYS[1])
redis.call('HSET', KEYS[2], 'version', v, 'artifact', ARGV[1], 'summary', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
return v
"""

_DELETE = """
local n = redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return n
"""


def _unavailable(e: Exception) -> StoreUnavailable:
    return StoreUnavailable(f"prompt store (Redis) is unreachable: {e}")


class RedisStore(PromptStore):
    def __init__(self, url: str, prefix: str = "ptserve"):
        self.url = url
        self.prefix = prefix
        self._redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._put = self._redis.register_script(_PUT)
        self._delete = self._redis.register_script(_DELETE)

    def _task_key(self, task_id: str) -> str:
        return f"{self.prefix}:task:{check_task_id(task_id)}"

    def put(self, task_id: str, data: bytes) -> dict:
        header = read_header(data)
        summary = summarize(task_id, 0, header)
        keys = [f"{self.prefix}:version:{check_task_id(task_id)}", self._task_key(task_id), f"{self.prefix}:tasks"]
        try:
            version = int(self._put(keys=keys, args=[data, json.dumps(summary), task_id]))
        except redis.RedisError as e:
            raise _unavailable(e) from None
        return {**summary, "version": version}

    def _hmget(self, task_id: str, *fields: str) -> list:
        try:
            return self._redis.hmget(self._task_key(task_id), fields)
        except redis.RedisError as e:
            raise _unavailable(e) from None

    def get(self, task_id: str) -> StoredPrompt | None:
        version, data = self._hmget(task_id, "version", "artifact")
        return None if version is None else StoredPrompt(task_id, int(version), data)

    def version(self, task_id: str) -> int | None:
        (version,) = self._hmget(task_id, "version")
        return None if version is None else int(version)

    def summary(self, task_id: str) -> dict | None:
        version, summary = self._hmget(task_id, "version", "summary")
        return None if version is None else {**json.loads(summary), "version": int(version)}

    def list(self) -> list[dict]:
        try:
            ids = sorted(m.decode() for m in self._redis.smembers(f"{self.prefix}:tasks"))
            pipe = self._redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.hmget(self._task_key(task_id), ("version", "summary"))
            rows = pipe.execute()
        except redis.RedisError as e:
            raise _unavailable(e) from None
        return [{**json.loads(s), "version": int(v)} for v, s in rows if v is not None]

    def delete(self, task_id: str) -> bool:
        keys = [self._task_key(task_id), f"{self.prefix}:tasks"]
        try:
            return bool(self._delete(keys=keys, args=[task_id]))
        except redis.RedisError as e:
            raise _unavailable(e) from None

    def ping(self) -> None:
        try:
            self._redis.ping()
        except redis.RedisError as e:
            raise _unavailable(e) from None

    def close(self) -> None:
        self._redis.close()
