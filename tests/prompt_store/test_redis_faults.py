"""The Redis store when Redis stops answering: an error answer stored nothing,
an unknown outcome says so, and repeating the same upload is then safe."""

import os
import signal

import pytest
import redis

from prompt_store.errors import StoreOutcomeUnknown, StoreUnavailable
from prompt_store.redis_fine_tuning_store import RedisFineTuningStore
from prompt_store.redis_store import RedisStore
from tests.helpers import fill_of, filled_artifact, start_redis, wait_until


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


def others(raw: redis.Redis) -> set[str]:
    """Ids of the connections Redis holds open besides `raw`'s own."""
    own = str(raw.client_id())
    return {c["id"] for c in raw.client_list() if c["id"] != own}


def wait_until_dropped(raw: redis.Redis, ids: set[str]) -> None:
    """Wait until Redis has dropped every connection in `ids` (ones the client
    closed). Redis reads a connection's bytes in order, its end last, so then
    it has run, or dropped with it, every command they had sent."""
    wait_until(lambda: not ids & others(raw), f"Redis to drop the store's closed connections {sorted(ids)}")


def test_an_upload_to_a_stopped_redis_answers_unavailable_and_stores_nothing(own_redis):
    proc, url = own_redis
    store = RedisStore(url + "?socket_timeout=0.5")
    raw = redis.Redis.from_url(url)
    store.put("other", filled_artifact(1.0))  # the connection is open and pooled
    used = others(raw)  # that one: the next put uses it, and closes it when it times out
    assert len(used) == 1, used
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(StoreUnavailable, match="unreachable"):
            store.put("t", filled_artifact(1.0))
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    wait_until_dropped(raw, used)  # anything Redis had received, it has run by now
    wait_until(lambda: not store.backoff.down, "the store's probe to find Redis answering again")
    assert store.get("t") is None and raw.get("ptserve:version:t") is None
    assert store.put("t", filled_artifact(1.0))["version"] == 1


def test_an_upload_redis_does_not_answer_is_unknown_and_a_retry_makes_one_version(own_redis):
    proc, url = own_redis
    store = RedisStore(url + "?socket_timeout=0.5")
    raw = redis.Redis.from_url(url)
    store.put("other", filled_artifact(1.0))
    used = others(raw)  # the store's pooled connection: the next put uses it, and closes it when it times out
    assert len(used) == 1, used
    raw.execute_command("CLIENT", "PAUSE", 600_000, "WRITE")  # reads answer; the put's script waits
    try:
        with pytest.raises(StoreOutcomeUnknown, match="unknown"):
            store.put("t", filled_artifact(1.0))
    finally:
        raw.execute_command("CLIENT", "UNPAUSE")
    wait_until_dropped(raw, used)  # the first script has run, or was dropped with its connection
    wait_until(lambda: not store.backoff.down, "the store's probe to find Redis answering again")
    # whether the first one ran or not, the same bytes again leave exactly version 1
    assert store.put("t", filled_artifact(1.0))["version"] == 1
    assert store.version("t") == 1 and fill_of(store.get("t")) == 1.0
    assert int(raw.get("ptserve:version:t")) == 1


def test_a_full_redis_refuses_uploads_saying_so_and_still_deletes(own_redis):
    """Over its maxmemory, Redis refuses a write that may use memory: the upload
    is a 503 that says Redis is out of memory, and a delete, which frees memory,
    goes through (its script is declared allow-oom)."""
    _, url = own_redis
    store = RedisStore(url)
    raw = redis.Redis.from_url(url)
    store.put("kept", filled_artifact(1.0))
    store.put("freed", filled_artifact(2.0))
    raw.config_set("maxmemory", 1)  # below what is used: every write that may use memory is refused
    with pytest.raises(StoreUnavailable, match=r"out of memory \(its maxmemory\)"):
        store.put("new", filled_artifact(3.0))
    assert store.delete("freed") is True
    assert store.get("freed") is None and fill_of(store.get("kept")) == 1.0 and store.get("new") is None
    files = RedisFineTuningStore(url)
    with pytest.raises(StoreUnavailable, match=r"fine-tuning store \(Redis\) is out of memory"):
        files.put_file({"id": "file-x", "created_at": 0}, b"{}")


def test_a_stopped_redis_is_remembered_and_calls_fail_at_once_until_it_answers_again(own_redis):
    """After one call waits out the socket timeout, the store counts Redis as down:
    calls fail at once without reaching it, until the probe finds it answering."""
    proc, url = own_redis
    store = RedisStore(url + "?socket_timeout=0.5", identity_max_lag=0)
    store.put("t", filled_artifact(1.0))
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(StoreUnavailable, match="unreachable"):
            store.identity("t")  # waits out the socket timeout
        assert store.backoff.down and store.backoff.refused == 0
        for call in (lambda: store.identity("t"), lambda: store.get("t"), store.list, store.ping,
                     lambda: store.put("u", filled_artifact(2.0)), lambda: store.delete("t")):  # fmt: skip
            with pytest.raises(StoreUnavailable, match="is tried again every 1 s"):
                call()
        assert store.backoff.refused == 6  # each refused at once, none sent
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    wait_until(lambda: not store.backoff.down, "the store's probe to find Redis answering again")
    assert store.identity("t").version == 1 and store.get("u") is None
    assert store.put("u", filled_artifact(2.0))["version"] == 1
    store.close()


def test_a_refused_password_is_an_answer_not_an_outage(own_redis):
    """AuthenticationError is a ConnectionError in redis-py, but Redis answered: no back-off."""
    proc, url = own_redis
    redis.Redis.from_url(url).config_set("requirepass", "right")
    wrong = RedisStore(url.replace("redis://", "redis://:wrong@"), identity_max_lag=0)
    for _ in range(2):
        with pytest.raises(StoreUnavailable, match="AuthenticationError"):
            wrong.ping()
    assert not wrong.backoff.down and wrong.backoff.refused == 0
    wrong.close()
