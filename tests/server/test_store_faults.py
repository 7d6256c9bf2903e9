"""What clients read when the prompt store fails: 503 when nothing was stored,
504 when the outcome is unknown, and never a local path."""

import httpx
import redis

from prompt_store.artifact import artifact_bytes
from ptcore.model import load_model
from server.api.app import create_app
from server.settings import Settings
from tests.helpers import LiveServer, deny, random_prompt, start_redis, wait_until


def serve(loaded, store: str) -> LiveServer:
    return LiveServer(create_app(Settings(model=loaded.info["name_or_path"], store=store, max_wait_ms=20), loaded))


def test_an_unreadable_disk_store_answers_503_without_paths(gpt2_dir, tmp_path, monkeypatch):
    loaded = load_model(str(gpt2_dir), device="cpu", dtype="float32")
    root = tmp_path / "store"
    gen = artifact_bytes(random_prompt(loaded, "[P:2]{input}"))
    with serve(loaded, str(root)) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        assert client.put("/v1/tasks/t", content=gen).status_code == 201
        deny(monkeypatch, root)  # from now on every filesystem call under the store root fails
        answers = {
            "list": client.get("/v1/tasks"),
            "summary": client.get("/v1/tasks/t"),
            "artifact": client.get("/v1/tasks/t/artifact"),
            "generate": client.post("/v1/tasks/t/generate", json={"input": "x", "max_new_tokens": 2}),
            "delete": client.delete("/v1/tasks/t"),
            "upload": client.put("/v1/tasks/u", content=gen),
            "ready": client.get("/ready"),
        }
        for name, r in answers.items():
            assert r.status_code == 503, (name, r.status_code, r.text)
            assert str(tmp_path) not in r.text and "/tmp" not in r.text, (name, r.text)
            assert "prompt store" in r.text, (name, r.text)
        monkeypatch.undo()
        assert client.post("/v1/tasks/t/generate", json={"input": "x", "max_new_tokens": 2}).status_code == 200
        assert client.get("/v1/tasks/u").status_code == 404


def connections(raw: redis.Redis) -> set[str]:
    """Ids of the connections Redis holds open for commands, besides `raw`'s own
    (subscribed ones, which the server's invalidation channel holds, aside)."""
    own = str(raw.client_id())
    return {c["id"] for c in raw.client_list() if c["id"] != own and "P" not in c["flags"]}


def test_an_upload_redis_does_not_confirm_is_504_and_the_same_upload_again_is_safe(gpt2_dir):
    loaded = load_model(str(gpt2_dir), device="cpu", dtype="float32")
    proc, url = start_redis()
    data = artifact_bytes(random_prompt(loaded, "[P:2]{input}", seed=3))
    try:
        with serve(loaded, url + "?socket_timeout=0.5") as live, httpx.Client(base_url=live.url, timeout=60) as c:
            assert c.get("/ready").status_code == 200  # its PING leaves a connection in the store's pool
            raw = redis.Redis.from_url(url)
            before = connections(raw)  # the put's connection is one of these (no other request is in flight)
            raw.execute_command("CLIENT", "PAUSE", 600_000, "WRITE")  # reads answer; the put's script waits
            try:
                r = c.put("/v1/tasks/t", content=data)
            finally:
                raw.execute_command("CLIENT", "UNPAUSE")
            assert r.status_code == 504 and "outcome is unknown" in r.json()["detail"], r.text
            # the server closed the put's connection; once Redis has dropped it, it has
            # run the script or dropped it with the connection (it reads a connection's
            # bytes in order, its end last)
            wait_until(lambda: before - connections(raw), "Redis to drop the connection of the unconfirmed put")
            store = live.app.state.engine.store  # the timeout counts Redis as down until its probe is answered
            wait_until(lambda: not store.backoff.down, "the store's probe to find Redis answering again")
            r = c.put("/v1/tasks/t", content=data)  # the client retries the same bytes
            assert r.status_code == 201 and r.json()["version"] == 1
            assert c.post("/v1/tasks/t/generate", json={"input": "x", "max_new_tokens": 2}).json()["version"] == 1
    finally:
        proc.kill()
        proc.wait()


def test_with_redis_stopped_cached_tasks_are_served_and_the_rest_refused_at_once(gpt2_dir):
    """SIGSTOP of redis-server: once one call has waited out the socket timeout, a
    cached task is served without asking Redis, others get 503 without waiting,
    and after SIGCONT the server uses Redis again, with no restart."""
    import os
    import signal

    loaded = load_model(str(gpt2_dir), device="cpu", dtype="float32")
    proc, url = start_redis()
    body = {"input": "x", "max_new_tokens": 2}
    try:
        with serve(loaded, url + "?socket_timeout=0.5") as live, httpx.Client(base_url=live.url, timeout=60) as c:
            for task, seed in (("cached", 1), ("cold", 2)):
                data = artifact_bytes(random_prompt(loaded, "[P:2]{input}", seed=seed))
                assert c.put(f"/v1/tasks/{task}", content=data).status_code == 201
            expected = c.post("/v1/tasks/cached/generate", json=body).json()  # now in the prompt cache
            backoff = live.app.state.engine.store.backoff
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                assert c.post("/v1/tasks/cached/generate", json=body).json() == expected  # after one timeout
                assert backoff.down
                refused = backoff.refused
                assert c.post("/v1/tasks/cached/generate", json=body).json() == expected
                cold = c.post("/v1/tasks/cold/generate", json=body)
                assert cold.status_code == 503 and "is tried again every 1 s" in cold.json()["detail"]
                assert c.get("/ready").status_code == 503
                assert backoff.refused == refused + 3  # none of them waited for Redis
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            wait_until(lambda: not backoff.down, "the store's probe to find Redis answering again")
            assert c.get("/ready").status_code == 200
            assert c.post("/v1/tasks/cold/generate", json=body).status_code == 200
    finally:
        proc.kill()
        proc.wait()
