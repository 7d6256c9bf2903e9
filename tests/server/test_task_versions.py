"""Kept versions over HTTP: a request may name a version the store keeps; each
version answers as its own prompt recomputed alone, also when several versions of
one task share a batch."""

import asyncio

import httpx
import pytest

from prompt_store.artifact import artifact_bytes
from prompt_store.template import render
from ptcore.model import load_model
from server.api.app import create_app
from server.settings import Settings
from tests.helpers import LiveServer, alone_greedy, alone_label_scores, random_prompt

TEMPLATE = "[P:2] Review: {input} [P:2] Sentiment:"
LABELS = {"positive": " good", "negative": " bad thing"}


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return load_model(str(gpt2_dir), device="cpu", dtype="float32")


@pytest.fixture
def client(gpt2, tmp_path):
    settings = Settings(model=gpt2.info["name_or_path"], store=str(tmp_path / "store"), keep_versions=2,
                        max_wait_ms=50)  # fmt: skip
    with LiveServer(create_app(settings, gpt2)) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def upload_versions(client, loaded, task_id, task_type="generate", labels=None):
    """Versions 1, 2 and 3 of a task, with different rows; -> their artifacts."""
    artifacts = [random_prompt(loaded, TEMPLATE, task_type, labels, seed=seed) for seed in (1, 2, 3)]
    for v, a in enumerate(artifacts, start=1):
        r = client.put(f"/v1/tasks/{task_id}", content=artifact_bytes(a))
        assert r.status_code == 201 and r.json()["version"] == v, r.text
    return artifacts


def test_versions_are_listed_and_each_kept_one_answers_as_itself(client, gpt2):
    artifacts = upload_versions(client, gpt2, "t")
    assert client.get("/v1/tasks/t").json()["versions"] == [3, 2]
    assert [t["versions"] for t in client.get("/v1/tasks").json()] == [[3, 2]]
    listed = client.get("/v1/tasks/t/versions").json()
    assert [(s["version"], s["template"]) for s in listed] == [(3, TEMPLATE), (2, TEMPLATE)]

    ids = render(artifacts[0].template, gpt2.tokenizer, {"input": "a fine film"}, gpt2.vocab_size)
    answers = {}
    for version in (2, 3, None):
        body = {"input": "a fine film", "max_new_tokens": 8, **({} if version is None else {"version": version})}
        r = client.post("/v1/tasks/t/generate", json=body)
        assert r.status_code == 200, r.text
        answers[version] = r.json()
    for version in (2, 3):
        assert answers[version]["version"] == version
        expected = alone_greedy(gpt2.model, artifacts[version - 1].embeddings, ids, gpt2.vocab_size, 8,
                                gpt2.eos_token_ids)  # fmt: skip
        assert answers[version]["token_ids"] == expected
    assert answers[None] == answers[3]  # no version: the latest
    assert answers[2]["token_ids"] != answers[3]["token_ids"]


def test_a_streamed_answer_names_the_version_it_ran(client, gpt2):
    upload_versions(client, gpt2, "t")
    body = {"input": "a fine film", "max_new_tokens": 4, "version": 2, "stream": True}
    with client.stream("POST", "/v1/tasks/t/generate", json=body) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"version":2' in events[-2].replace(" ", "")


def test_classify_runs_the_version_named(client, gpt2):
    artifacts = upload_versions(client, gpt2, "c", "classify", LABELS)
    ids = render(artifacts[0].template, gpt2.tokenizer, {"input": "dull"}, gpt2.vocab_size)
    label_ids = [gpt2.tokenizer(v, add_special_tokens=False)["input_ids"] for v in LABELS.values()]
    for version in (2, 3):
        out = client.post("/v1/tasks/c/classify", json={"input": "dull", "version": version}).json()
        assert out["version"] == version
        expected = alone_label_scores(gpt2.model, artifacts[version - 1].embeddings, ids, gpt2.vocab_size, label_ids)
        assert max(abs(x - y) for x, y in zip(out["scores"].values(), expected)) < 1e-5


def test_two_versions_in_one_batch_each_equal_their_own_recomputation(client, gpt2):
    artifacts = upload_versions(client, gpt2, "t")
    inputs = ["a fine film", "dull and long", "I laughed", "never again"]

    async def fire():
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=120) as ac:
            calls = [
                ac.post("/v1/tasks/t/generate", json={"input": text, "max_new_tokens": 6, "version": version})
                for text in inputs
                for version in (2, 3)
            ]
            return await asyncio.gather(*calls)

    responses = iter(asyncio.run(fire()))
    for text in inputs:
        ids = render(artifacts[0].template, gpt2.tokenizer, {"input": text}, gpt2.vocab_size)
        for version in (2, 3):
            out = next(responses).json()
            expected = alone_greedy(gpt2.model, artifacts[version - 1].embeddings, ids, gpt2.vocab_size, 6,
                                    gpt2.eos_token_ids)  # fmt: skip
            assert (out["version"], out["token_ids"]) == (version, expected)


def test_a_version_not_kept_is_a_404_naming_the_kept_ones(client, gpt2):
    upload_versions(client, gpt2, "t")
    for r in (
        client.post("/v1/tasks/t/generate", json={"input": "x", "version": 1}),
        client.post("/v1/tasks/t/generate", json={"input": "x", "version": 9}),
        client.get("/v1/tasks/t/artifact", params={"version": 1}),
    ):
        assert r.status_code == 404
        assert r.json()["detail"].startswith("task 't' has no version ")
        assert r.json()["detail"].endswith(": the store keeps versions 3, 2 (newest first)")
    missing = client.post("/v1/tasks/nope/generate", json={"input": "x", "version": 1})
    assert missing.status_code == 404 and missing.json()["detail"] == "no prompt is stored for task 'nope'"
    assert client.get("/v1/tasks/nope/versions").status_code == 404


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (0, "Input should be greater than or equal to 1"),
        (-1, "Input should be greater than or equal to 1"),
        ("2", "Input should be a valid integer"),
        (2.0, "Input should be a valid integer"),
        (True, "Input should be a valid integer"),
    ],
)
def test_a_version_that_is_not_a_positive_integer_is_a_422(client, gpt2, version, message):
    upload_versions(client, gpt2, "t")
    r = client.post("/v1/tasks/t/generate", json={"input": "x", "version": version})
    assert r.status_code == 422
    assert [(e["loc"], e["msg"]) for e in r.json()["detail"]] == [(["body", "version"], message)]


def test_a_hand_written_prompt_has_no_versions(client):
    r = client.post("/v1/handwritten/generate", json={"template": "Say {input}", "input": "x", "version": 2})
    assert r.status_code == 422
    message = "Value error, a hand-written prompt has no versions: leave 'version' out"
    assert [(e["loc"], e["msg"]) for e in r.json()["detail"]] == [(["body", "version"], message)]


def test_an_older_versions_artifact_downloads_and_rolls_back(client, gpt2):
    artifacts = upload_versions(client, gpt2, "t")
    old = client.get("/v1/tasks/t/artifact", params={"version": 2})
    assert old.content == artifact_bytes(artifacts[1]) and old.headers["x-ptserve-version"] == "2"
    again = client.put("/v1/tasks/t", content=old.content)  # a rollback: version 2's rows as version 4
    assert again.status_code == 201 and again.json()["version"] == 4
    assert client.get("/v1/tasks/t").json()["versions"] == [4, 3]
    assert client.get("/v1/tasks/t/artifact").content == artifact_bytes(artifacts[1])


def test_a_delete_removes_every_version(client, gpt2):
    upload_versions(client, gpt2, "t")
    assert client.post("/v1/tasks/t/generate", json={"input": "x", "version": 2}).status_code == 200
    assert client.delete("/v1/tasks/t").status_code == 204
    assert client.get("/v1/tasks/t/versions").status_code == 404
    r = client.post("/v1/tasks/t/generate", json={"input": "x", "version": 2})
    assert r.status_code == 404 and r.json()["detail"] == "no prompt is stored for task 't'"
