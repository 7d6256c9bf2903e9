"""Kept versions: a store keeps the latest `keep_versions` versions of a task, on
disk and in a real redis-server alike (the `open_store` fixture: conftest.py)."""

import json
import threading

import pytest

from prompt_store.artifact import read_artifact, read_header, summarize
from prompt_store.disk_store import DiskStore
from prompt_store.store import PromptIdentity, digest_of
from tests.helpers import fill_of, filled_artifact


def put_fills(store, task_id, fills):
    for fill in fills:
        store.put(task_id, filled_artifact(float(fill)))


def test_the_latest_versions_are_kept_and_older_ones_go(open_store):
    store = open_store(keep_versions=3)
    put_fills(store, "t", [1, 2, 3, 4, 5])
    assert store.summary("t")["versions"] == [5, 4, 3]
    assert [(v, fill_of(store.get("t", v))) for v in (5, 4, 3)] == [(5, 5.0), (4, 4.0), (3, 3.0)]
    assert store.get("t", 2) is None and store.get("t", 1) is None and store.get("t", 6) is None
    for v in (5, 4, 3):
        assert store.identity("t", v) == PromptIdentity(v, digest_of(filled_artifact(float(v))))
    assert store.identity("t", 2) is None and store.identity("t").version == 5
    assert store.get("t").version == 5 and fill_of(store.get("t")) == 5.0
    assert [t["versions"] for t in store.list()] == [[5, 4, 3]]


def test_versions_lists_each_kept_version_summary_newest_first(open_store):
    store = open_store(keep_versions=2)
    store.put("t", filled_artifact(1.0, template="[P:2]{input}"))
    store.put("t", filled_artifact(2.0, template="Q: {input} [P:2]"))
    store.put("t", filled_artifact(3.0, template="{input} [P:2] A:"))
    expected = [summarize("t", v, read_header(store.get("t", v).data)) for v in (3, 2)]
    assert store.versions("t") == expected
    assert [s["template"] for s in expected] == ["{input} [P:2] A:", "Q: {input} [P:2]"]
    assert store.versions("missing") is None


def test_keeping_one_version_keeps_only_the_latest(open_store):
    store = open_store(keep_versions=1)
    put_fills(store, "t", [1, 2, 3])
    assert store.summary("t")["versions"] == [3]
    assert store.get("t", 2) is None and [s["version"] for s in store.versions("t")] == [3]


def test_a_delete_removes_every_version_and_numbers_go_on(open_store):
    store = open_store(keep_versions=3)
    put_fills(store, "t", [1, 2, 3])
    assert store.delete("t") is True
    assert store.get("t", 2) is None and store.identity("t", 3) is None and store.versions("t") is None
    assert store.put("t", filled_artifact(9.0))["version"] == 4
    assert store.summary("t")["versions"] == [4]


def test_a_smaller_keep_applies_at_the_next_upload(open_store):
    put_fills(open_store(keep_versions=5), "t", [1, 2, 3, 4])
    store = open_store(keep_versions=2)
    assert store.summary("t")["versions"] == [4, 3, 2, 1]  # nothing is removed by opening the store
    put_fills(store, "t", [5])
    assert store.summary("t")["versions"] == [5, 4]
    assert store.get("t", 3) is None and fill_of(store.get("t", 4)) == 4.0


def test_uploading_an_older_versions_bytes_again_makes_it_the_latest(open_store):
    """A rollback: the kept version's file, uploaded again, is a new version."""
    store = open_store(keep_versions=3)
    put_fills(store, "t", [1, 2])
    assert store.put("t", store.get("t", 1).data)["version"] == 3
    assert fill_of(store.get("t")) == 1.0 and store.summary("t")["versions"] == [3, 2, 1]


def test_concurrent_puts_keep_exactly_the_newest_versions_whole(open_store):
    store = open_store(keep_versions=4)
    threads = [threading.Thread(target=store.put, args=("c", filled_artifact(float(i)))) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.summary("c")["versions"] == [12, 11, 10, 9]
    for v in (12, 11, 10, 9):
        stored = store.get("c", v)
        assert stored.digest == digest_of(stored.data) and read_artifact(stored.data).embeddings.shape == (2, 4)
    assert len({store.get("c", v).digest for v in (12, 11, 10, 9)}) == 4


def test_keep_versions_must_be_at_least_one(open_store):
    with pytest.raises(ValueError) as caught:
        open_store(keep_versions=0)
    assert str(caught.value) == "keep_versions must be an integer >= 1 (1: only the latest), got 0"


def test_disk_files_are_one_per_kept_version(tmp_path):
    store = DiskStore(tmp_path, keep_versions=2)
    put_fills(store, "t", [1, 2, 3])
    names = sorted(p.name for p in (tmp_path / "t").glob("*.safetensors"))
    assert [n.split(".")[0] for n in names] == ["2", "3"]


def test_a_redis_record_from_before_kept_versions_is_kept_on_the_next_put(redis_url, redis_prefix):
    """A task written by an older ptserve (no `kept` field, no digest) becomes the
    first kept version, its digest computed from its bytes."""
    from prompt_store.redis_store import RedisStore

    store = RedisStore(redis_url, prefix=redis_prefix, keep_versions=3)
    old = filled_artifact(1.0)
    summary = json.dumps(summarize("t", 0, read_header(old)))
    store._redis.hset(f"{redis_prefix}:task:t", mapping={"version": 7, "artifact": old, "summary": summary})
    store._redis.set(f"{redis_prefix}:version:t", 7)
    store._redis.sadd(f"{redis_prefix}:tasks", "t")
    assert store.summary("t")["versions"] == [7]
    assert store.put("t", filled_artifact(2.0))["version"] == 8
    assert store.summary("t")["versions"] == [8, 7]
    assert store.identity("t", 7) == PromptIdentity(7, digest_of(old))
    assert store.get("t", 7).data == old and store.get("t", 7).digest == digest_of(old)
    # back as the latest (its digest field is empty): the identity still names its bytes, as get() does
    assert store.drop_version("t", 8) is True
    assert store.identity("t") == store.get("t").identity == PromptIdentity(7, digest_of(old))
    assert store.put("t", old)["version"] == 7  # the same bytes: no new version
    store.close()
