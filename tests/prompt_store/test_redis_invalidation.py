"""Identities from memory (prompt_store/redis_invalidation.py): a lookup costs
no Redis command while the channel is confirmed, a write through another store
is seen at once, and a lost or silent channel falls back to the HMGET."""

import time

import pytest
import redis

from prompt_store.redis_store import RedisStore
from tests.helpers import filled_artifact, start_redis


@pytest.fixture
def own_redis():
    """A redis-server of this test's own: its connections get killed and its
    command counts must be this test's alone."""
    proc, url = start_redis()
    try:
        yield url
    finally:
        proc.kill()
        proc.wait()


def hmgets(raw) -> int:
    return raw.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0)


def wait_confirmed(store, task_id, timeout=5.0):
    """Until a lookup of `task_id` is answered from memory."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        store.identity(task_id)
        if store._watcher.lookup(task_id)[0]:
            return
        time.sleep(0.02)
    raise AssertionError("the invalidation channel was never confirmed")


@pytest.fixture
def writer_and_reader(own_redis):
    """Two replicas' stores on one Redis, and a plain client to count commands."""
    writer, reader = RedisStore(own_redis), RedisStore(own_redis)
    try:
        yield writer, reader, redis.Redis.from_url(own_redis)
    finally:
        writer.close()
        reader.close()


def test_a_remembered_identity_costs_no_command_and_every_write_is_seen_at_once(writer_and_reader):
    writer, reader, raw = writer_and_reader
    writer.put("t", filled_artifact(0.0))
    wait_confirmed(reader, "t")
    before = hmgets(raw)
    for _ in range(200):
        assert reader.identity("t").version == 1
    assert hmgets(raw) == before  # 200 lookups, no command

    # no sleep between the write returning and the lookup: the writer's
    # PING after its script means the message is already on the reader's socket
    for i in range(1, 21):
        put = writer.put("t", filled_artifact(float(i)))
        assert reader.identity("t").version == put["version"] == i + 1
        wait_confirmed(reader, "t")
    assert writer.delete("t")
    assert reader.identity("t") is None
    assert writer.put("t", filled_artifact(99.0))["version"] == 22
    assert reader.identity("t").version == 22


def test_a_write_through_the_same_store_is_seen_by_its_next_lookup(own_redis):
    store = RedisStore(own_redis)
    try:
        store.put("t", filled_artifact(1.0))
        wait_confirmed(store, "t")
        store._watcher._conn.can_read = lambda timeout=0: False  # its own message never arrives
        assert store.put("t", filled_artifact(2.0))["version"] == 2
        assert store.identity("t").version == 2
    finally:
        store.close()


def test_after_the_subscriber_connection_is_killed_the_next_lookup_reads_redis(writer_and_reader):
    writer, reader, raw = writer_and_reader
    writer.put("t", filled_artifact(1.0))
    wait_confirmed(reader, "t")
    assert raw.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
    writer.put("t", filled_artifact(2.0))  # published to nobody
    before = hmgets(raw)
    assert reader.identity("t").version == 2  # the lookup found the connection closed
    assert hmgets(raw) == before + 1

    wait_confirmed(reader, "t")  # subscribed again: from memory again
    assert reader._watcher.subscriptions == 2
    before = hmgets(raw)
    for _ in range(50):
        assert reader.identity("t").version == 2
    assert hmgets(raw) == before
    writer.put("t", filled_artifact(3.0))
    assert reader.identity("t").version == 3


def test_a_held_up_invalidation_is_stale_for_at_most_max_lag(own_redis):
    """The subscriber reads nothing (as if its packets were held up in the
    network): lookups may return the old identity, but only until the last
    confirmation is `max_lag` old; then they read Redis and see the write."""
    max_lag = 0.3
    writer, reader = RedisStore(own_redis), RedisStore(own_redis, identity_max_lag=max_lag)
    try:
        writer.put("t", filled_artifact(1.0))
        wait_confirmed(reader, "t")
        conn = reader._watcher._conn
        conn.can_read = lambda timeout=0: False  # messages and PONGs stay in the socket
        held_at = time.monotonic()
        writer.put("t", filled_artifact(2.0))
        seen = []
        while time.monotonic() - held_at < 2.0:
            seen.append((time.monotonic() - held_at, reader.identity("t").version))
            time.sleep(0.01)
        assert seen[0][1] == 1  # the documented window: the message was not read
        first_new = next(t for t, v in seen if v == 2)
        assert first_new <= max_lag + 0.1
        assert all(v == 2 for t, v in seen if t >= first_new)
        del conn.can_read  # the held-up messages arrive: from memory again, and right
        wait_confirmed(reader, "t")
        assert reader.identity("t").version == 2
    finally:
        writer.close()
        reader.close()


def test_max_lag_zero_reads_every_identity_from_redis(own_redis):
    store = RedisStore(own_redis, identity_max_lag=0)
    raw = redis.Redis.from_url(own_redis)
    try:
        store.put("t", filled_artifact(1.0))
        before = hmgets(raw)
        for _ in range(20):
            assert store.identity("t").version == 1
        assert hmgets(raw) == before + 20
    finally:
        store.close()
