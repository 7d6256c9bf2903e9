"""Access tokens, back-pressure, deadlines, disconnects and size limits, over real HTTP."""

import asyncio
import logging
import time

import httpx
import pytest

import server.continuous
import server.runner
from prompt_store.artifact import artifact_bytes
from server.app import create_app
from server.settings import Settings
from tests.conftest import random_prompt
from tests.server.live_server import LiveServer


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    from server.model import load_model

    return load_model(str(gpt2_dir), device="cpu", dtype="float32")


def serve(loaded, tmp_path, **settings):
    s = Settings(model=loaded.info["name_or_path"], store=str(tmp_path / "store"), **settings)
    return LiveServer(create_app(s, loaded))


@pytest.fixture
def slow_steps(monkeypatch):
    """Every decode step takes 50 ms more, so requests last long enough to interrupt."""
    for module in (server.continuous, server.runner):
        real = module.step_rows

        def slow(logits, rows, real=real):
            time.sleep(0.05)
            return real(logits, rows)

        monkeypatch.setattr(module, "step_rows", slow)


def test_write_routes_need_the_token_and_inference_optionally(gpt2, tmp_path, caplog):
    data = artifact_bytes(random_prompt(gpt2, "[P:2]{input}"))
    with (
        serve(gpt2, tmp_path, api_token="w-secret", inference_token="i-secret") as live,
        httpx.Client(base_url=live.url, timeout=60) as c,
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic w-secret"}):
            r = c.put("/v1/tasks/t", content=data, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "Bearer" in r.text
        write = {"Authorization": "Bearer w-secret"}
        assert c.put("/v1/tasks/t", content=data, headers=write).status_code == 201
        assert c.get("/v1/tasks/t").status_code == 200  # reading summaries stays open
        assert c.post("/v1/tasks/t/generate", json={"input": "x"}).status_code == 401
        assert c.post("/v1/tasks/t/generate", json={"input": "x"}, headers=write).status_code == 401
        ok = c.post("/v1/tasks/t/generate", json={"input": "x"}, headers={"Authorization": "Bearer i-secret"})
        assert ok.status_code == 200
        assert c.delete("/v1/tasks/t").status_code == 401
        assert c.delete("/v1/tasks/t", headers=write).status_code == 204
    with caplog.at_level(logging.WARNING), serve(gpt2, tmp_path / "open"):
        pass
    assert any("ANYONE" in r.getMessage() for r in caplog.records)


def test_a_full_queue_answers_429_with_retry_after(gpt2, tmp_path, slow_steps):
    with serve(gpt2, tmp_path, max_queue=1, max_running=1) as live:
        httpx.put(f"{live.url}/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))

        async def fire():
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as c:
                body = {"input": "x", "max_new_tokens": 10}
                return await asyncio.gather(*(c.post("/v1/tasks/t/generate", json=body) for _ in range(8)))

        responses = asyncio.run(fire())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 429 in codes, codes
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and "waiting" in refused.json()["detail"]


def wait_until_idle(client, seconds=3.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stats = client.get("/v1/stats").json()
        if stats["running"] == 0 and stats["queue_depth"] == 0:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"still busy: {stats}")


def test_a_request_past_its_deadline_is_504_and_frees_its_slot(gpt2, tmp_path, slow_steps):
    with serve(gpt2, tmp_path, request_timeout_s=0.5) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        c.put("/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))
        start = time.monotonic()
        r = c.post("/v1/tasks/t/generate", json={"input": "x", "max_new_tokens": 200})  # ~10 s of steps
        assert r.status_code == 504 and "0.5 s" in r.json()["detail"]
        assert time.monotonic() - start < 3
        wait_until_idle(c)


def test_a_client_that_disconnects_has_its_work_cancelled(gpt2, tmp_path, slow_steps):
    with serve(gpt2, tmp_path) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        c.put("/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live.url}/v1/tasks/t/generate", json={"input": "x", "max_new_tokens": 200}, timeout=0.4)
        stats = wait_until_idle(c)  # its slot is back within the poll interval and a step
        decode_steps = sum(1 for b in stats["batches"]["recent"] if b["kind"] == "decode")
        assert 1 <= decode_steps < 100  # it was generating, and stopped far short of its 200 tokens


def test_size_limits(gpt2, tmp_path):
    with (
        serve(gpt2, tmp_path, max_json_bytes=2048, max_virtual_tokens=4) as live,
        httpx.Client(base_url=live.url, timeout=60) as c,
    ):
        r = c.put("/v1/tasks/big", content=artifact_bytes(random_prompt(gpt2, "[P:3]{input}[P:3]")))
        assert r.status_code == 422 and "at most 4" in r.json()["detail"]
        assert c.put("/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}"))).status_code == 201
        r = c.post("/v1/tasks/t/generate", json={"input": "x" * 5000})
        assert r.status_code == 413 and "2048" in r.json()["detail"]
        r = c.post("/v1/tasks/t/generate", content=b'{"input": "x"}', headers={"content-type": "text/plain"})
        assert 400 <= r.status_code < 500
        assert c.post("/v1/tasks/t/generate", json={"input": "x", "max_new_tokens": 2}).status_code == 200


def test_the_static_engine_also_stops_work_for_a_departed_client(gpt2, tmp_path, slow_steps):
    with serve(gpt2, tmp_path, engine="static") as live, httpx.Client(base_url=live.url, timeout=60) as c:
        c.put("/v1/tasks/t", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{live.url}/v1/tasks/t/generate", json={"input": "x", "max_new_tokens": 200}, timeout=0.4)
        deadline = time.monotonic() + 3
        while not c.get("/v1/stats").json()["batches"]["recent"] and time.monotonic() < deadline:
            time.sleep(0.05)
        (batch,) = c.get("/v1/stats").json()["batches"]["recent"]
        assert batch["seconds"] < 2  # 200 steps would take 10 s
