"""Fine-tuning files and jobs in Redis (see fine_tuning_store.py). Keys, under
the store's prefix:
- `{p}:ft:file:{id}`   hash {record, data}; `{p}:ft:files` sorted set of file ids by creation time;
- `{p}:ft:job:{id}`    the job object (JSON); `{p}:ft:jobs` sorted set of job ids by creation time;
- `{p}:ft:events:{id}` list of the job's events (JSON), oldest first;
- `{p}:ft:lease:{id}`  until when its replica holds the job (Unix time).
A file's hash is written in one HSET, and added to the set after it, so a
listed file always has its bytes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import redis

from .errors import StoreUnavailable
from .fine_tuning_store import FineTuningStore, newest_first
from .redis_connect import connect

log = logging.getLogger(__name__)


class RedisFineTuningStore(FineTuningStore):
    def __init__(self, url: str, prefix: str = "ptserve"):
        self._redis = connect(url, socket_timeout=5, socket_connect_timeout=5)
        self.p = f"{prefix}:ft"

    def _call(self, fn: Callable):
        try:
            return fn(self._redis)
        except redis.RedisError as e:
            log.error("fine-tuning store (Redis): %s", e)
            if isinstance(e, redis.exceptions.OutOfMemoryError):
                raise StoreUnavailable("the fine-tuning store (Redis) is out of memory (its maxmemory): delete "
                                       "files or tasks, or raise maxmemory (docs/operations.md)") from None  # fmt: skip
            raise StoreUnavailable(f"the fine-tuning store (Redis) failed ({type(e).__name__}); "
                                   "the server log has details") from None  # fmt: skip

    def put_file(self, record: dict, data: bytes) -> None:
        key = f"{self.p}:file:{record['id']}"
        self._call(lambda r: r.hset(key, mapping={"record": json.dumps(record), "data": data}))
        self._call(lambda r: r.zadd(f"{self.p}:files", {record["id"]: record["created_at"]}))

    def file(self, file_id: str) -> dict | None:
        raw = self._call(lambda r: r.hget(f"{self.p}:file:{file_id}", "record"))
        return None if raw is None else json.loads(raw)

    def file_content(self, file_id: str) -> bytes | None:
        return self._call(lambda r: r.hget(f"{self.p}:file:{file_id}", "data"))

    def files(self) -> list[dict]:
        ids = self._call(lambda r: r.zrange(f"{self.p}:files", 0, -1))
        return newest_first([f for i in ids if (f := self.file(i.decode())) is not None])

    def delete_file(self, file_id: str) -> bool:
        gone = self._call(lambda r: r.delete(f"{self.p}:file:{file_id}"))
        self._call(lambda r: r.zrem(f"{self.p}:files", file_id))
        return bool(gone)

    def put_job(self, record: dict) -> None:
        self._call(lambda r: r.set(f"{self.p}:job:{record['id']}", json.dumps(record)))
        self._call(lambda r: r.zadd(f"{self.p}:jobs", {record["id"]: record["created_at"]}))

    def job(self, job_id: str) -> dict | None:
        raw = self._call(lambda r: r.get(f"{self.p}:job:{job_id}"))
        return None if raw is None else json.loads(raw)

    def jobs(self) -> list[dict]:
        ids = self._call(lambda r: r.zrange(f"{self.p}:jobs", 0, -1))
        return newest_first([j for i in ids if (j := self.job(i.decode())) is not None])

    def put_lease(self, job_id: str, until: float) -> None:
        self._call(lambda r: r.set(f"{self.p}:lease:{job_id}", repr(float(until))))

    def lease(self, job_id: str) -> float | None:
        raw = self._call(lambda r: r.get(f"{self.p}:lease:{job_id}"))
        return None if raw is None else float(raw)

    def add_event(self, job_id: str, event: dict) -> None:
        self._call(lambda r: r.rpush(f"{self.p}:events:{job_id}", json.dumps(event)))

    def events(self, job_id: str) -> list[dict]:
        return [json.loads(e) for e in self._call(lambda r: r.lrange(f"{self.p}:events:{job_id}", 0, -1))]
