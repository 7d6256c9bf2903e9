"""The Redis store when Redis stops answering: an error answer stored nothing,
an unknown outcome says so, and repeating the same upload is then safe."""

import os
import signal
import time

import pytest
import redis

from prompt_store.errors import StoreOutcomeUnknown, StoreUnavailable
from prompt_store.redis_store import RedisStore
from tests.helpers import fill_of, filled_artifact, start_redis


@pytest.fixture
def own_redis():
    """A redis-server of this test's own, since it gets paused."""
    proc, url = start_redis()
    try:
        yield proc, url
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


def test_an_upload_to_a_stopped_redis_answers_unavailable_and_stores_nothing(own_redis):
    proc, url = own_redis
    store = RedisStore(url + "?socket_timeout=0.5")
    store.put("other", filled_artifact(1.0))  # the connection is open and pooled
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(StoreUnavailable, match="unreachable"):
            store.put("t", filled_artifact(1.0))
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    time.sleep(0.3)  # anything Redis had received, it has run by now
    raw = redis.Redis.from_url(url)
    assert store.get("t") is None and raw.get("ptserve:version:t") is None
    assert store.put("t", filled_artifact(1.0))["version"] == 1


def test_an_upload_redis_does_not_answer_is_unknown_and_a_retry_makes_one_version(own_redis):
    proc, url = own_redis
    store = RedisStore(url + "?socket_timeout=0.5")
    raw = redis.Redis.from_url(url)
    store.put("other", filled_artifact(1.0))
    raw.execute_command("CLIENT", "PAUSE", 2000, "WRITE")  # reads answer; the put's script waits
    paused_until = time.monotonic() + 2.0
    with pytest.raises(StoreOutcomeUnknown, match="unknown"):
        store.put("t", filled_artifact(1.0))
    time.sleep(max(0.0, paused_until - time.monotonic()) + 0.3)
    # whether the first one ran or not, the same bytes again leave exactly version 1
    assert store.put("t", filled_artifact(1.0))["version"] == 1
    assert store.version("t") == 1 and fill_of(store.get("t")) == 1.0
    assert int(raw.get("ptserve:version:t")) == 1
