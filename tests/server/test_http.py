"""End to end: the real server (uvicorn on loopback) with a tiny model."""

import asyncio
import json
import pickle
import time

import httpx
import pytest
import torch
from safetensors.torch import save

from prompt_store.artifact import artifact_bytes
from prompt_store.template import render
from ptcore.model import load_model
from server.api.app import create_app
from server.settings import Settings
from tests.helpers import LiveServer, alone_greedy, alone_label_scores, random_prompt, start_redis


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return load_model(str(gpt2_dir), device="cpu", dtype="float32")


def serve(loaded, store: str, **settings):
    s = Settings(model=loaded.info["name_or_path"], store=store, **{"max_wait_ms": 50, **settings})
    return LiveServer(create_app(s, loaded))


@pytest.fixture
def server(gpt2, tmp_path):
    with serve(gpt2, str(tmp_path / "store"), max_batch_size=16) as live:
        yield live


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


GEN_TASKS = {
    "summarize": ("[P:3]{input}[P:3]", 1),
    "review": ("[P:2] Review: {input} [P:2] Sentiment:", 2),
    "nli": ("{premise}[P:4]{hypothesis}?[P:1]", 3),
}
CLS_TASKS = {
    "sentiment": ("[P:2]{input}[P:2] It was", {"positive": " good", "negative": " bad thing"}, 4),
    "topic": ("Topic of {input}[P:5]", {"json": " json", "logs": " logging", "paths": " a path"}, 5),
}


def upload_all(client, loaded):
    artifacts = {}
    for task, (template, seed) in GEN_TASKS.items():
        artifacts[task] = random_prompt(loaded, template, seed=seed)
    for task, (template, labels, seed) in CLS_TASKS.items():
        artifacts[task] = random_prompt(loaded, template, "classify", labels, seed=seed)
    for task, a in artifacts.items():
        r = client.put(f"/v1/tasks/{task}", content=artifact_bytes(a))
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 1 and r.json()["num_virtual_tokens"] == a.embeddings.shape[0]
    return artifacts


def request_for(i):
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "json",
        "parses",
        "logging",
        "paths",
    ]
    text = " ".join(words[: 1 + i % len(words)])
    tasks = [*GEN_TASKS, *CLS_TASKS]
    task = tasks[i % len(tasks)]
    if task == "nli":
        fields = {"premise": text, "hypothesis": words[i % len(words)]}
        body = {"inputs": fields}
    else:
        fields = {"input": text}
        body = {"input": text}
    if task in GEN_TASKS:
        body["max_new_tokens"] = 4 + i % 7
        return task, "generate", fields, body
    return task, "classify", fields, body


@pytest.mark.parametrize("engine", ["continuous", "static"])
def test_concurrent_mixed_requests_equal_alone_and_are_batched(loaded, tmp_path, engine):
    with (
        serve(loaded, str(tmp_path / "store"), max_batch_size=16, engine=engine) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        assert client.get("/v1/stats").json()["engine"] == engine
        check_concurrent_requests(server, client, loaded)


def check_concurrent_requests(server, client, gpt2):
    artifacts = upload_all(client, gpt2)
    n = 40

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            calls = []
            for i in range(n):
                task, route, _, body = request_for(i)
                calls.append(ac.post(f"/v1/tasks/{task}/{route}", json=body))
            return await asyncio.gather(*calls)

    responses = asyncio.run(fire())
    eos = gpt2.eos_token_ids
    V = gpt2.vocab_size
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        task, route, fields, body = request_for(i)
        a = artifacts[task]
        ids = render(a.template, gpt2.tokenizer, fields, V)
        out = r.json()
        assert out["task_id"] == task and out["version"] == 1
        if route == "generate":
            assert out["token_ids"] == alone_greedy(gpt2.model, a.embeddings, ids, V, body["max_new_tokens"], eos)
        else:
            label_ids = [gpt2.tokenizer(v, add_special_tokens=False)["input_ids"] for v in a.labels.values()]
            expected = alone_label_scores(gpt2.model, a.embeddings, ids, V, label_ids)
            assert list(out["scores"]) == list(a.labels)
            assert max(abs(x - y) for x, y in zip(out["scores"].values(), expected)) < 1e-5
    stats = client.get("/v1/stats").json()["batches"]
    assert stats["requests"] == n
    assert stats["max_batch_size_seen"] > 1, stats
    assert any(b["tasks"] > 1 for b in stats["recent"]), "no batch mixed different tasks"


def test_task_routes_and_new_versions(client, gpt2):
    a1 = random_prompt(gpt2, "[P:3]{input}", seed=1)
    a2 = random_prompt(gpt2, "[P:3]{input}", seed=2)
    assert client.put("/v1/tasks/t1", content=artifact_bytes(a1)).status_code == 201
    first = client.post("/v1/tasks/t1/generate", json={"input": "hello", "max_new_tokens": 6}).json()
    assert first["version"] == 1
    r = client.put("/v1/tasks/t1", content=artifact_bytes(a2))
    assert r.status_code == 201 and r.json()["version"] == 2
    second = client.post("/v1/tasks/t1/generate", json={"input": "hello", "max_new_tokens": 6}).json()
    assert second["version"] == 2 and second["token_ids"] != first["token_ids"]
    assert client.get("/v1/tasks/t1").json()["version"] == 2
    download = client.get("/v1/tasks/t1/artifact")
    assert download.content == artifact_bytes(a2) and download.headers["x-ptserve-version"] == "2"
    assert [t["task_id"] for t in client.get("/v1/tasks").json()] == ["t1"]
    assert client.delete("/v1/tasks/t1").status_code == 204
    for r in (
        client.post("/v1/tasks/t1/generate", json={"input": "hello"}),
        client.get("/v1/tasks/t1"),
        client.delete("/v1/tasks/t1"),
    ):
        assert r.status_code == 404 and "t1" in r.json()["detail"]


def test_health_ready_and_request_errors(client, gpt2):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["model"]["hidden_size"] == 64
    client.put("/v1/tasks/g", content=artifact_bytes(random_prompt(gpt2, "{premise}[P:2]{hypothesis}")))
    cases = [
        ("/v1/tasks/nope/generate", {"input": "x"}, 404, "nope"),
        ("/v1/tasks/g/classify", {"inputs": {"premise": "a", "hypothesis": "b"}}, 422, "generate task"),
        ("/v1/tasks/g/generate", {"input": "x"}, 422, "missing field"),
        ("/v1/tasks/g/generate", {"inputs": {"premise": "a"}}, 422, "missing field"),
        ("/v1/tasks/g/generate", {"input": "x", "inputs": {"a": "b"}}, 422, "exactly one"),
        ("/v1/tasks/g/generate", {"inputs": {"premise": "a", "hypothesis": "b"}, "max_new_tokens": 5000}, 422, "limit"),
        (
            "/v1/tasks/g/generate",
            {"inputs": {"premise": "a", "hypothesis": "b"}, "temperature": -1},
            422,
            "temperature",
        ),
        ("/v1/tasks/bad%20id/generate", {"input": "x"}, 422, "invalid task id"),
        (
            "/v1/tasks/g/generate",
            {"inputs": {"premise": "a", "hypothesis": "b"}, "temperature": 1e-45},
            422,
            "temperature",
        ),
        ("/v1/tasks/g/generate", {"inputs": {"premise": "a", "hypothesis": "b"}, "seed": 2**70}, 422, "seed"),
        ("/v1/tasks/g/generate", {"inputs": {"premise": "a", "hypothesis": "b"}, "stop": [""]}, 422, "stop"),
        ("/v1/tasks/g/generate", {"inputs": {"premise": "a", "hypothesis": "b"}, "top_p": 0}, 422, "top_p"),
        ("/v1/tasks/g/generate", {"inputs": {"premise": "a", "hypothesis": "b"}, "top_k": -1}, 422, "top_k"),
        # JSON types as they are: true is not 1, 3.0 is not a count, "true" is not a boolean
        ("/v1/tasks/g/generate", {"input": "x", "max_new_tokens": True}, 422, "max_new_tokens"),
        ("/v1/tasks/g/generate", {"input": "x", "max_new_tokens": 3.0}, 422, "max_new_tokens"),
        ("/v1/tasks/g/generate", {"input": "x", "temperature": True}, 422, "temperature"),
        ("/v1/tasks/g/generate", {"input": "x", "top_p": True}, 422, "top_p"),
        ("/v1/tasks/g/generate", {"input": "x", "top_k": False}, 422, "top_k"),
        ("/v1/tasks/g/generate", {"input": "x", "seed": True}, 422, "seed"),
        ("/v1/tasks/g/generate", {"input": "x", "stream": "true"}, 422, "stream"),
        ("/v1/completions", {"model": "g", "prompt": "x", "max_tokens": True}, 422, "max_tokens"),
    ]
    for url, body, status, message in cases:
        r = client.post(url, json=body)
        assert r.status_code == status, (url, body, r.text)
        assert message in r.text, r.text


def raw_artifact(rows: torch.Tensor, meta: dict) -> bytes:
    return save({"prompt_embeddings": rows}, metadata={"ptserve": json.dumps(meta)})


def bad_uploads(loaded):
    H, V = loaded.info["hidden_size"], loaded.vocab_size
    base = loaded.info

    def meta(**over):
        m = {"format_version": 1, "task_type": "generate", "template": "[P:2]{input}", "base_model": base}
        m.update(over)
        return m

    good_rows = torch.randn(2, H)
    return [
        (
            "wrong hidden size",
            raw_artifact(torch.randn(2, H * 2), meta(base_model={**base, "hidden_size": H * 2})),
            422,
            "hidden size",
        ),
        (
            "wrong vocab size",
            raw_artifact(good_rows, meta(base_model={**base, "vocab_size": V + 1})),
            422,
            "vocab_size",
        ),
        (
            "other weights",
            raw_artifact(good_rows, meta(base_model={**base, "fingerprint": "0" * 16})),
            422,
            "fingerprint",
        ),
        ("row count", raw_artifact(torch.randn(3, H), meta()), 422, "3 rows but template"),
        ("nan", raw_artifact(torch.full((2, H), float("nan")), meta()), 422, "NaN"),
        ("not safetensors", b"PK\x03\x04 this is a zip file, not safetensors", 422, "not a safetensors file"),
        (
            "missing tensor",
            save({"weights": good_rows}, metadata={"ptserve": json.dumps(meta())}),
            422,
            "prompt_embeddings",
        ),
        ("unknown task type", raw_artifact(good_rows, meta(task_type="summarize")), 422, "task_type"),
        ("classify without labels", raw_artifact(good_rows, meta(task_type="classify")), 422, "labels"),
        ("empty body", b"", 422, "not a safetensors file"),
        ("a pickle", pickle.dumps({"prompt_embeddings": [[0.0] * H] * 2}), 422, "not a safetensors file"),
        (
            "wrong dtype",
            raw_artifact(torch.zeros(2, H, dtype=torch.int64), meta()),
            422,
            "float32, float16 or bfloat16",
        ),
        ("too large", b"\0" * (2 * 1024 * 1024), 413, "limit"),
    ]


def test_bad_uploads_are_refused_and_write_nothing(gpt2, tmp_path):
    with (
        serve(gpt2, str(tmp_path / "store"), max_artifact_bytes=1024 * 1024) as live,
        httpx.Client(base_url=live.url, timeout=60) as client,
    ):
        good = artifact_bytes(random_prompt(gpt2, "[P:2]{input}", seed=9))
        assert client.put("/v1/tasks/keep", content=good).status_code == 201
        before = client.get("/v1/tasks").json()
        for name, data, status, message in bad_uploads(gpt2):
            for task in ("keep", "fresh"):
                r = client.put(f"/v1/tasks/{task}", content=data)
                assert r.status_code == status, (name, r.text)
                assert message in r.json()["detail"], (name, r.json())
        for bad_id in ("bad%20id", "t%C3%A2che", "a" * 129):
            r = client.put(f"/v1/tasks/{bad_id}", content=good)
            assert r.status_code == 422 and "invalid task id" in r.json()["detail"], (bad_id, r.text)
        assert client.put("/v1/tasks/..", content=good).status_code == 404  # ".." never reaches the route
        assert client.get("/v1/tasks").json() == before
        assert client.get("/v1/tasks/fresh").status_code == 404
        assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["keep"]
        assert client.post("/v1/tasks/keep/generate", json={"input": "still here"}).json()["version"] == 1


def test_server_on_redis_store_notices_new_versions(gpt2, redis_url):
    # a fresh logical database keeps this test apart from the store suite's keys
    url = redis_url.rsplit("/", 1)[0] + "/3"
    import redis

    redis.Redis.from_url(url).flushdb()
    with serve(gpt2, url) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        assert client.get("/ready").status_code == 200
        for seed in (1, 2):
            r = client.put("/v1/tasks/shared", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}", seed=seed)))
            assert r.status_code == 201 and r.json()["version"] == seed
            assert client.post("/v1/tasks/shared/generate", json={"input": "x"}).json()["version"] == seed
        assert client.delete("/v1/tasks/shared").status_code == 204
        assert client.post("/v1/tasks/shared/generate", json={"input": "x"}).status_code == 404


def test_artifact_generation_defaults_are_checked_at_upload_and_used(client, gpt2):
    for bad, message in [
        ({"temperature": "hot"}, "temperature"),
        ({"stop": 5}, "stop"),
        ({"top_p": 0, "temperature": 1}, "top_p"),
        ({"seed": 2**70, "temperature": 1}, "seed"),
        ({"max_new_tokens": 10**6}, "max_new_tokens"),
    ]:
        a = random_prompt(gpt2, "[P:2]{input}", generation=bad)
        r = client.put("/v1/tasks/defaults", content=artifact_bytes(a))
        assert r.status_code == 422 and message in r.json()["detail"], (bad, r.text)
    assert client.get("/v1/tasks/defaults").status_code == 404
    a = random_prompt(gpt2, "[P:2]{input}", seed=3, generation={"max_new_tokens": 3})
    assert client.put("/v1/tasks/defaults", content=artifact_bytes(a)).status_code == 201
    out = client.post("/v1/tasks/defaults/generate", json={"input": "abc"}).json()
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 3
    out = client.post("/v1/tasks/defaults/generate", json={"input": "abc", "max_new_tokens": 5}).json()
    assert len(out["token_ids"]) == 5  # the request wins over the artifact


def test_store_outage_cached_prompts_keep_serving(gpt2):
    proc, url = start_redis()
    try:
        with serve(gpt2, url) as live, httpx.Client(base_url=live.url, timeout=60) as client:
            for task in ("warm", "cold"):
                r = client.put(f"/v1/tasks/{task}", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))
                assert r.status_code == 201
            assert client.post("/v1/tasks/warm/generate", json={"input": "x"}).status_code == 200
            proc.terminate()
            proc.wait()
            assert client.get("/ready").status_code == 503
            assert client.post("/v1/tasks/warm/generate", json={"input": "x"}).status_code == 200
            r = client.post("/v1/tasks/cold/generate", json={"input": "x"})
            assert r.status_code == 503 and "unreachable" in r.json()["detail"]
            r = client.put("/v1/tasks/new", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))
            assert r.status_code == 503
            # Redis comes back (empty: it kept nothing on disk): everything works again, no restart
            proc, _ = start_redis(port=int(url.rsplit(":", 1)[1].split("/")[0]))
            deadline = time.monotonic() + 10
            while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert client.get("/ready").status_code == 200
            r = client.put("/v1/tasks/new", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))
            assert r.status_code == 201
            assert client.post("/v1/tasks/new/generate", json={"input": "x"}).status_code == 200
            assert client.post("/v1/tasks/warm/generate", json={"input": "x"}).status_code == 404  # lost with Redis
    finally:
        proc.kill()
        proc.wait()


def test_prometheus_metrics(client, gpt2):
    client.put("/v1/tasks/m", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}")))
    for _ in range(3):
        assert client.post("/v1/tasks/m/generate", json={"input": "x", "max_new_tokens": 4}).status_code == 200
    client.post("/v1/tasks/made-up/generate", json={"input": "x"})  # 404: not labelled by its task id
    text = client.get("/metrics").text
    assert 'ptserve_requests_total{code="200",route="/v1/tasks/{task_id}/generate",task="m"} 3.0' in text
    assert 'ptserve_requests_total{code="404",route="/v1/tasks/{task_id}/generate",task=""} 1.0' in text
    assert "made-up" not in text
    assert 'ptserve_generated_tokens_total{task="m"} 12.0' in text
    assert 'ptserve_request_seconds_bucket{le="+Inf",route="/v1/tasks/{task_id}/generate"} 4.0' in text
    for name in ("ptserve_queue_depth 0.0", "ptserve_running_rows 0.0", "ptserve_prompt_cache_hits_total",
                 "ptserve_prefix_cache_misses_total", 'ptserve_batch_size_bucket{le="+Inf"}'):  # fmt: skip
        assert name in text, name
