"""Prometheus metrics (server/api/metrics.py) over real HTTP."""

import httpx
import pytest

from prompt_store.artifact import artifact_bytes
from server.api.app import create_app
from server.settings import Settings
from tests.helpers import LiveServer, random_prompt


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    from ptcore.model import load_model

    return load_model(str(gpt2_dir), device="cpu", dtype="float32")


def test_a_deleted_task_leaves_no_series(gpt2, tmp_path):
    s = Settings(model=gpt2.info["name_or_path"], store=str(tmp_path / "store"))
    tasks = [f"gone-{i}" for i in range(5)]
    with LiveServer(create_app(s, gpt2)) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        data = artifact_bytes(random_prompt(gpt2, "[P:2]{input}"))
        for task in tasks + ["kept"]:
            assert c.put(f"/v1/tasks/{task}", content=data).status_code == 201
            r = c.post(f"/v1/tasks/{task}/generate", json={"input": "x", "max_new_tokens": 2})
            assert r.status_code == 200
            assert c.get(f"/v1/tasks/{task}").status_code == 200
        before = c.get("/metrics").text
        assert all(f'task="{task}"' in before for task in tasks)
        for task in tasks:
            assert c.delete(f"/v1/tasks/{task}").status_code == 204
        after = c.get("/metrics").text
    left = [line for line in after.splitlines() if any(f'task="{task}"' in line for task in tasks)]
    assert left == []
    assert 'ptserve_generated_tokens_total{task="kept"}' in after  # other tasks keep theirs
    assert 'ptserve_requests_total{code="204",route="/v1/tasks/{task_id}",task=""} 5.0' in after


def test_series_of_a_task_deleted_elsewhere_or_finished_after_its_delete_go(gpt2, tmp_path):
    """Another replica's DELETE (here: the shared store's own delete), and a
    request of the task that finishes after the DELETE: the next scrape has
    no series of the task."""
    from prompt_store.factory import open_store

    s = Settings(model=gpt2.info["name_or_path"], store=str(tmp_path / "store"))
    data = artifact_bytes(random_prompt(gpt2, "[P:2]{input}"))
    with LiveServer(create_app(s, gpt2)) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        for task in ("elsewhere", "late", "kept"):
            assert c.put(f"/v1/tasks/{task}", content=data).status_code == 201
            assert c.post(f"/v1/tasks/{task}/generate", json={"input": "x", "max_new_tokens": 2}).status_code == 200
        hand = {"input": "x", "template": "Say {input}", "max_new_tokens": 2}  # counted as "(hand-written)"
        assert c.post("/v1/handwritten/generate", json=hand).status_code == 200
        assert 'task="elsewhere"' in c.get("/metrics").text
        assert open_store(str(tmp_path / "store")).delete("elsewhere")  # another replica deleted it
        body = {"input": "x", "max_new_tokens": 64, "ignore_eos": True, "stream": True}
        with c.stream("POST", "/v1/tasks/late/generate", json=body) as streaming:
            lines = streaming.iter_lines()
            assert next(lines).startswith("data: ")  # it runs
            assert c.delete("/v1/tasks/late").status_code == 204
            rest = [line for line in lines if line]  # it finishes with the prompt it started with, counted then
        assert rest[-1] == "data: [DONE]"
        after = c.get("/metrics").text
    assert [line for line in after.splitlines() if 'task="elsewhere"' in line or 'task="late"' in line] == []
    assert 'ptserve_generated_tokens_total{task="kept"} 2.0' in after
    assert 'ptserve_generated_tokens_total{task="(hand-written)"} 2.0' in after
