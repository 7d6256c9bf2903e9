"""Scale-out: two real server processes share one real redis-server."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import redis

from prompt_store.artifact import artifact_bytes
from prompt_store.factory import open_fine_tuning_store
from ptcore.model import load_model
from server.api.app import create_app
from server.settings import Settings
from tests.helpers import free_port, random_prompt, wait_until


def start_server(model_dir, store, tmp_path, name, **env):
    port = free_port()
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--store", store, "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server {name} exited: {(tmp_path / f'{name}.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server {name} did not become ready")


@pytest.fixture
def shared_store(redis_url):
    url = redis_url.rsplit("/", 1)[0] + "/5"  # a logical database of its own
    redis.Redis.from_url(url).flushdb()
    return url


def test_an_upload_through_one_replica_is_served_by_the_other(gpt2_dir, shared_store, tmp_path):
    loaded = load_model(str(gpt2_dir), device="cpu", dtype="float32")
    (a, url_a), (b, url_b) = (start_server(gpt2_dir, shared_store, tmp_path, n) for n in ("a", "b"))
    try:
        with httpx.Client(timeout=60) as client:
            body = {"input": "json parse", "max_new_tokens": 6}
            v1 = client.put(
                f"{url_a}/v1/tasks/shared", content=artifact_bytes(random_prompt(loaded, "[P:3]{input}", seed=1))
            )
            assert v1.status_code == 201 and v1.json()["version"] == 1
            first = client.post(f"{url_b}/v1/tasks/shared/generate", json=body).json()
            assert first["version"] == 1
            v2 = client.put(
                f"{url_a}/v1/tasks/shared", content=artifact_bytes(random_prompt(loaded, "[P:3]{input}", seed=2))
            )
            assert v2.json()["version"] == 2
            uploaded = time.monotonic()
            while True:  # B must answer with v2 within 1 s of the upload
                second = client.post(f"{url_b}/v1/tasks/shared/generate", json=body).json()
                if second["version"] == 2 or time.monotonic() - uploaded > 1.0:
                    break
            assert second["version"] == 2, "replica B still served v1 a second after the upload"
            assert second["token_ids"] != first["token_ids"]
            assert client.delete(f"{url_a}/v1/tasks/shared").status_code == 204
            assert client.post(f"{url_b}/v1/tasks/shared/generate", json=body).status_code == 404
    finally:
        for proc in (a, b):
            proc.terminate()
            proc.wait(timeout=30)


def test_device_map_is_passed_through(gpt2_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    settings = Settings(model=str(gpt2_dir), store=str(tmp_path / "s"), device="cpu", device_map="auto")
    loaded = load_model(settings.model, settings.device, "float32", device_map=settings.device_map)
    assert seen.get("device_map") == "auto"
    assert loaded.device.type == "cpu"  # no GPU here: accelerate puts everything on the CPU
    app = create_app(settings, loaded)
    from tests.helpers import LiveServer

    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        assert client.get("/v1/stats").json()["engine"] == "static"
        client.put("/v1/tasks/t", content=artifact_bytes(random_prompt(loaded, "[P:2]{input}")))
        assert client.post("/v1/tasks/t/generate", json={"input": "x", "max_new_tokens": 3}).status_code == 200


def test_after_redis_lost_its_data_every_replica_serves_the_new_v1_at_once(gpt2_dir, shared_store):
    """Redis restarts empty and a different prompt is uploaded under the same task
    id: it is version 1 again, and both replicas (the one that took the upload and
    the other) must serve it on their very next request, prefix KV included."""
    from prompt_store.template import render
    from tests.helpers import LiveServer, alone_greedy

    loaded = load_model(str(gpt2_dir), device="cpu", dtype="float32")
    template = "Note:[P:2] about {input}[P:1]"  # a static prefix: the prefix cache is used
    old, new = (random_prompt(loaded, template, seed=s) for s in (11, 12))
    body = {"input": "json parse error", "max_new_tokens": 6}
    ids = render(new.template, loaded.tokenizer, {"input": body["input"]}, loaded.vocab_size)
    expected = alone_greedy(loaded.model, new.embeddings, ids, loaded.vocab_size, 6, loaded.eos_token_ids)
    settings = Settings(model=str(gpt2_dir), store=shared_store, max_wait_ms=20)
    with (
        LiveServer(create_app(settings, loaded)) as a,
        LiveServer(create_app(settings, loaded)) as b,
        httpx.Client(timeout=60) as client,
    ):
        assert client.put(f"{a.url}/v1/tasks/t", content=artifact_bytes(old)).json()["version"] == 1
        before = [client.post(f"{r.url}/v1/tasks/t/generate", json=body).json() for r in (a, b)]
        assert before[0]["token_ids"] == before[1]["token_ids"] != expected
        assert all(client.get(f"{r.url}/v1/stats").json()["prefix_cache"]["size"] == 1 for r in (a, b))

        redis.Redis.from_url(shared_store).flushdb()  # a Redis restarted without its data
        r = client.put(f"{a.url}/v1/tasks/t", content=artifact_bytes(new))
        assert r.status_code == 201 and r.json()["version"] == 1
        for replica in (a, b):
            out = client.post(f"{replica.url}/v1/tasks/t/generate", json=body).json()
            assert (out["version"], out["token_ids"]) == (1, expected), f"{replica.url} served the lost prompt"
            assert client.get(f"{replica.url}/v1/tasks/t/artifact").content == artifact_bytes(new)


def test_a_killed_replicas_job_turns_failed_on_the_other_within_its_lease(gpt2_dir, shared_store, tmp_path):
    """Replica a runs a long job and renews its lease; killed (SIGKILL: no
    shutdown code runs), the lease runs out and replica b reports the job
    failed, "the server running it stopped"."""
    lease = {"PTSERVE_JOB_LEASE_S": "3"}
    (a, url_a), (b, url_b) = (start_server(gpt2_dir, shared_store, tmp_path, n, **lease) for n in ("a", "b"))
    store = open_fine_tuning_store(shared_store)
    try:
        data = "".join(json.dumps({"input": f"word {i}", "output": f" answer {i % 3}"}) + "\n" for i in range(16))
        f = httpx.post(f"{url_a}/v1/files", files={"file": ("t.jsonl", data.encode())}, data={"purpose": "fine-tune"})
        base = httpx.get(f"{url_a}/v1/models").json()["data"][0]["id"]
        job = httpx.post(f"{url_a}/v1/fine_tuning/jobs", json={"model": base, "training_file": f.json()["id"],
                         "suffix": "long", "hyperparameters": {"n_epochs": 1000}}).json()  # fmt: skip
        job_url = f"{url_b}/v1/fine_tuning/jobs/{job['id']}"
        wait_until(lambda: httpx.get(job_url).json()["status"] == "running", "replica b to see the job running")
        first = store.lease(job["id"])
        wait_until(lambda: store.lease(job["id"]) > first, "replica a to renew the job's lease")
        assert httpx.get(job_url).json()["status"] == "running"  # renewed: b does not take it for dead
        a.send_signal(signal.SIGKILL)
        a.wait()
        failed = wait_until(lambda: (j := httpx.get(job_url).json())["status"] == "failed" and j, "the job to fail")
        assert failed["error"] == {"code": "server_stopped", "message": "the server running it stopped", "param": None}
        assert httpx.get(f"{url_b}/v1/tasks/long").status_code == 404  # nothing was stored
    finally:
        for proc in (a, b):
            proc.kill()
            proc.wait()
