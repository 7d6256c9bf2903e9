"""The Redis store behind Redis Sentinel: the URL, and a real failover on
loopback (a master, one replica, one sentinel): every upload acknowledged and
replicated before the master died is served afterwards, new uploads continue
its version numbers, and while no master is known every call is a clean
StoreUnavailable (503), never an unexpected error."""

import os
import signal
import time
from dataclasses import dataclass

import httpx
import pytest
import redis
from redis.sentinel import MasterNotFoundError, Sentinel

from prompt_store.artifact import artifact_bytes
from prompt_store.errors import StoreUnavailable
from prompt_store.factory import open_store
from prompt_store.redis_connect import parse_sentinel_url
from prompt_store.redis_store import RedisStore
from prompt_store.store import digest_of
from ptcore.model import load_model
from tests.helpers import filled_artifact, live_server, random_prompt, start_redis, start_sentinel, wait_until


def test_the_url_names_sentinels_service_and_db():
    sentinels, service, options = parse_sentinel_url("redis+sentinel://h1:26380,h2,[::1]:26381/mymaster/2")
    assert sentinels == [("h1", 26380), ("h2", 26379), ("::1", 26381)]
    assert service == "mymaster" and options == {"node": {"db": 2}, "sentinel": {}}


def test_the_url_password_is_the_masters_and_sentinels_have_their_own():
    url = "rediss+sentinel://app:p%40ss@h1:26379/mymaster?sentinel_password=s3&socket_timeout=0.5"
    _, _, options = parse_sentinel_url(url)
    assert options["node"] == {"db": 0, "username": "app", "password": "p@ss", "ssl": True, "socket_timeout": 0.5}
    assert options["sentinel"] == {"password": "s3"}


@pytest.mark.parametrize(
    "url, says",
    [
        ("redis+sentinel://h1:26379", "SERVICE_NAME"),
        ("redis+sentinel://h1:26379/mymaster/zero", "DB a number"),
        ("redis+sentinel://h1:26379/mymaster?timeout=1", "unknown option 'timeout'"),
        ("redis+sentinel://h1:port/mymaster", "bad port"),
        ("redis+sentinel://:secret@h1,,h2/mymaster", "HOST:PORT"),
    ],
)
def test_a_bad_url_says_what_is_wrong_without_the_password(url, says):
    with pytest.raises(ValueError, match=says) as caught:
        open_store(url)
    assert "secret" not in str(caught.value)


@dataclass
class Cluster:
    master: object  # subprocess.Popen
    master_port: int
    replica_port: int
    sentinel: object
    sentinel_port: int

    def url(self, socket_timeout: float) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/ptserve/0?socket_timeout={socket_timeout}"

    def replicated(self) -> None:
        """Block until the replica has every write the master acknowledged."""
        assert redis.Redis(port=self.master_port).execute_command("WAIT", 1, 5000) == 1

    def master_port_known(self) -> int | None:
        """The master's port as clients learn it (the sentinel's address for the
        service answers the promoted replica earlier, while the failover runs)."""
        try:
            return Sentinel([("127.0.0.1", self.sentinel_port)]).discover_master("ptserve")[1]
        except MasterNotFoundError:
            return None

    def kill_master_unnoticed(self) -> None:
        """SIGKILL the master with the sentinel paused, so that no master is known
        until resume_sentinel(). Keep the pause under 2 s: a sentinel whose clock
        jumps further enters TILT mode and does nothing for 30 s."""
        os.kill(self.sentinel.pid, signal.SIGSTOP)
        self.master.kill()
        self.master.wait()

    def resume_sentinel_and_wait_for_failover(self, timeout: float = 30.0) -> float:
        os.kill(self.sentinel.pid, signal.SIGCONT)
        start = time.monotonic()
        while self.master_port_known() != self.replica_port:
            assert time.monotonic() - start < timeout, "the sentinel did not promote the replica"
            time.sleep(0.05)
        return time.monotonic() - start


@pytest.fixture
def cluster(tmp_path):
    # the replica keeps the RDB of its first sync in --dir: the test's folder, not the checkout
    fast_sync = ("--repl-diskless-sync-delay", "0", "--dir", str(tmp_path))
    master, master_url = start_redis(None, *fast_sync)
    master_port = int(master_url.rsplit(":", 1)[1].split("/")[0])
    procs = [master]
    try:
        replica, replica_url = start_redis(None, "--replicaof", "127.0.0.1", str(master_port), *fast_sync)
        procs.append(replica)
        replica_port = int(replica_url.rsplit(":", 1)[1].split("/")[0])
        _wait(lambda: redis.Redis(port=replica_port).info("replication")["master_link_status"] == "up")
        sentinel, sentinel_port = start_sentinel(tmp_path, master_port)
        procs.append(sentinel)
        # a sentinel learns of replicas from the master's INFO: wait until it knows this one
        _wait(lambda: len(redis.Redis(port=sentinel_port).execute_command("SENTINEL", "replicas", "ptserve")) == 1)
        yield Cluster(master, master_port, replica_port, sentinel, sentinel_port)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait()


def _wait(ready, timeout: float = 15.0) -> None:
    start = time.monotonic()
    while not ready():
        assert time.monotonic() - start < timeout, "the test cluster did not come up"
        time.sleep(0.05)


def test_a_failover_keeps_acknowledged_uploads_and_the_gap_is_unavailable(cluster):
    store = open_store(cluster.url(socket_timeout=0.3))
    assert isinstance(store, RedisStore)
    uploads = {"a": filled_artifact(2.0), "b": filled_artifact(3.0, "[P:2] Review: {input}")}
    store.put("a", filled_artifact(1.0))
    for task_id, data in uploads.items():
        store.put(task_id, data)
    before = {task_id: store.get(task_id).identity for task_id in uploads}
    assert before["a"].version == 2 and before["b"].version == 1
    cluster.replicated()

    cluster.kill_master_unnoticed()
    try:
        for call in (lambda: store.put("c", filled_artifact(4.0)), lambda: store.get("a"), store.ping):
            with pytest.raises(StoreUnavailable, match="unreachable"):
                call()
    finally:
        took = cluster.resume_sentinel_and_wait_for_failover()
    print(f"failover {took:.2f} s after the sentinel resumed")
    # the store counted Redis as down: its probe finds the new master (prompt_store/redis_backoff.py)
    wait_until(lambda: not store.backoff.down, "the store's probe to reach the new master")

    for task_id, data in uploads.items():
        stored = store.get(task_id)
        assert stored.identity == before[task_id] and stored.data == data and stored.digest == digest_of(data)
    assert store.get("c") is None  # the upload refused during the gap wrote nothing
    assert store.put("a", filled_artifact(5.0))["version"] == 3
    assert store.put("c", filled_artifact(4.0))["version"] == 1
    store.close()


def test_a_server_on_sentinel_answers_503_during_a_failover_and_everything_after(cluster, gpt2_dir):
    loaded = load_model(str(gpt2_dir), device="cpu", dtype="float32")
    uploads = {f"t{i}": artifact_bytes(random_prompt(loaded, "[P:2]{input}", seed=i)) for i in range(3)}
    generate = {"input": "x", "max_new_tokens": 2}
    with (
        live_server(loaded, cluster.url(socket_timeout=0.2), max_wait_ms=20) as live,
        httpx.Client(base_url=live.url, timeout=60) as client,
    ):
        for task_id, data in uploads.items():
            assert client.put(f"/v1/tasks/{task_id}", content=data).status_code == 201
        assert client.post("/v1/tasks/t0/generate", json=generate).status_code == 200  # t0 is now on the device
        cluster.replicated()

        cluster.kill_master_unnoticed()
        try:
            answers = {
                "upload": client.put("/v1/tasks/new", content=uploads["t0"]),
                "uncached generate": client.post("/v1/tasks/t1/generate", json=generate),
                "ready": client.get("/ready"),
            }
            cached = client.post("/v1/tasks/t0/generate", json=generate)
        finally:
            cluster.resume_sentinel_and_wait_for_failover()
        backoff = live.app.state.engine.store.backoff
        wait_until(lambda: not backoff.down, "the store's probe to reach the new master")
        for name, r in answers.items():
            assert r.status_code == 503 and "prompt store" in r.json()["detail"], (name, r.status_code, r.text)
        assert cached.status_code == 200 and cached.json()["version"] == 1  # served from the device's copy

        assert client.get("/ready").status_code == 200
        for task_id, data in uploads.items():
            assert client.get(f"/v1/tasks/{task_id}").json()["version"] == 1
            assert client.get(f"/v1/tasks/{task_id}/artifact").content == data
            assert client.post(f"/v1/tasks/{task_id}/generate", json=generate).json()["version"] == 1
        assert client.get("/v1/tasks/new").status_code == 404
        r = client.put("/v1/tasks/t2", content=artifact_bytes(random_prompt(loaded, "[P:2]{input}", seed=9)))
        assert r.status_code == 201 and r.json()["version"] == 2


def test_a_write_right_after_the_master_is_demoted_goes_to_the_new_master(cluster):
    """A planned failover (SENTINEL FAILOVER) keeps the old master running, as a
    replica. The store's pooled connection to it must not take the next write
    there (refused with READONLY): Redis closes its clients' connections when
    it is demoted, and the pool reconnects through the sentinel, to the new
    master. The first write after the failover succeeds."""
    store = open_store(cluster.url(socket_timeout=2.0))
    assert store.put("a", filled_artifact(1.0))["version"] == 1  # the pool now holds a connection to the master
    cluster.replicated()
    _wait(lambda: failover_started(cluster))  # refused (NOGOODSLAVE) until the sentinel has judged the replica
    _wait(lambda: cluster.master_port_known() == cluster.replica_port)
    _wait(lambda: redis.Redis(port=cluster.master_port).info("replication")["role"] == "slave")
    assert store.put("a", filled_artifact(2.0))["version"] == 2
    assert redis.Redis(port=cluster.replica_port).info("replication")["role"] == "master"
    assert store.get("a").data == filled_artifact(2.0)
    store.close()


def failover_started(cluster) -> bool:
    try:
        return redis.Redis(port=cluster.sentinel_port).execute_command("SENTINEL", "FAILOVER", "ptserve")
    except redis.ResponseError as e:
        if "NOGOODSLAVE" not in str(e):
            raise
        return False


def test_a_master_short_of_replicas_refuses_an_upload_whole():
    """`min-replicas-to-write` (docs/deployment.md's knob against losing writes that were
    not replicated yet) makes Redis refuse the put script before it runs: 503,
    nothing stored, no version used."""
    proc, url = start_redis(None, "--min-replicas-to-write", "1")
    try:
        store = RedisStore(url)
        with pytest.raises(StoreUnavailable, match="ResponseError"):
            store.put("t", filled_artifact(1.0))
        redis.Redis.from_url(url).config_set("min-replicas-to-write", 0)
        assert store.get("t") is None and store.put("t", filled_artifact(1.0))["version"] == 1
    finally:
        proc.kill()
        proc.wait()
