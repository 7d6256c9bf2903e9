"""Streaming (server-sent events) and the OpenAI-compatible routes, with the real openai client."""

import json

import httpx
import pytest
from openai import OpenAI

from prompt_store.artifact import artifact_bytes
from ptcore.model import load_model
from server.api.app import create_app
from server.settings import Settings
from tests.helpers import LiveServer, random_prompt


@pytest.fixture(scope="module", params=["continuous", "static"])
def live(request, gpt2_dir, tmp_path_factory):
    loaded = load_model(str(gpt2_dir), device="cpu", dtype="float32")
    settings = Settings(model=str(gpt2_dir), store=str(tmp_path_factory.mktemp("store")), engine=request.param)
    with LiveServer(create_app(settings, loaded)) as server:
        for task, seed in (("story", 1), ("other", 2)):
            httpx.put(
                f"{server.url}/v1/tasks/{task}",
                content=artifact_bytes(random_prompt(loaded, "[P:3]{input}", seed=seed)),
            )
        httpx.put(f"{server.url}/v1/tasks/cls", content=artifact_bytes(
            random_prompt(loaded, "[P:2]{input}", "classify", {"a": " a", "b": " b"})))  # fmt: skip
        pair = random_prompt(loaded, "[P:2]{premise} so {hypothesis}")  # two fields: not for /v1/completions
        httpx.put(f"{server.url}/v1/tasks/pair", content=artifact_bytes(pair))
        yield server


def events(response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.mark.parametrize("extra", [{}, {"temperature": 0.9, "seed": 7}])
def test_a_streamed_answer_equals_the_plain_one(live, extra):
    body = {"input": "the quick brown fox", "max_new_tokens": 20, **extra}
    plain = httpx.post(f"{live.url}/v1/tasks/story/generate", json=body, timeout=60).json()
    with httpx.stream("POST", f"{live.url}/v1/tasks/story/generate", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        got = events(r)
    assert got[-1] == "[DONE]"
    final = got[-2]
    assert (
        final["done"] and final["token_ids"] == plain["token_ids"] and final["finish_reason"] == plain["finish_reason"]
    )
    assert "".join(e["text"] for e in got[:-1]) == plain["text"]
    assert len(got) > 3  # it really came in pieces


def test_streaming_never_sends_text_past_a_stop_string(live):
    body = {"input": "the quick brown fox", "max_new_tokens": 20}
    full = httpx.post(f"{live.url}/v1/tasks/story/generate", json=body, timeout=60).json()["text"]
    stop = full[6:9]
    plain = httpx.post(f"{live.url}/v1/tasks/story/generate", json={**body, "stop": stop}, timeout=60).json()
    with httpx.stream("POST", f"{live.url}/v1/tasks/story/generate", json={**body, "stop": stop, "stream": True},
                      timeout=60) as r:  # fmt: skip
        got = events(r)
    assert "".join(e["text"] for e in got[:-1]) == plain["text"] == full[: full.find(stop)]


def test_openai_client_models_and_completions(live):
    client = OpenAI(base_url=f"{live.url}/v1", api_key="unused")
    base, *tasks = client.models.list().data
    # not classify tasks, nor a template whose fields a prompt cannot fill
    assert base.ptserve_base_model and sorted(m.id for m in tasks) == ["other", "story"]
    ours = httpx.post(f"{live.url}/v1/tasks/story/generate", json={"input": "hello", "max_new_tokens": 12}).json()
    done = client.completions.create(model="story", prompt="hello", max_tokens=12)
    assert done.choices[0].text == ours["text"] and done.choices[0].finish_reason == ours["finish_reason"]
    assert done.usage.completion_tokens == len(ours["token_ids"]) and done.model == "story"
    pieces = list(client.completions.create(model="story", prompt="hello", max_tokens=12, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == ours["text"]
    assert pieces[-1].choices[0].finish_reason == ours["finish_reason"]
    sampled = [client.completions.create(model="story", prompt=["hello"], max_tokens=8, temperature=1.0, seed=3,
                                         top_p=0.9).choices[0].text for _ in range(2)]  # fmt: skip
    assert sampled[0] == sampled[1]


def test_openai_errors_are_4xx(live):
    client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    import openai

    for kwargs, status in [
        (dict(model="missing", prompt="x"), 404),
        (dict(model="cls", prompt="x"), 422),
        (dict(model="story", prompt="x", n=2), 422),
        (dict(model="story", prompt=["a", "b"]), 422),
        (dict(model="story", prompt="x", max_tokens=10**6), 422),
    ]:
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(**kwargs)
        assert err.value.status_code == status, kwargs
    for kwargs, field in [  # OpenAI's fields the engine has nothing for: named, never dropped silently
        (dict(presence_penalty=0.5), "presence_penalty"),
        (dict(frequency_penalty=-1.0), "frequency_penalty"),
        (dict(logit_bias={"50256": -100}), "logit_bias"),
        (dict(best_of=2), "best_of"),
        (dict(suffix="!"), "suffix"),
        (dict(n=0), "n must be 1"),
    ]:
        with pytest.raises(openai.UnprocessableEntityError, match=field):
            client.completions.create(model="story", prompt="x", **kwargs)
    neutral = client.completions.create(model="story", prompt="x", max_tokens=4, presence_penalty=0, best_of=1)
    assert neutral.choices[0].text == client.completions.create(model="story", prompt="x", max_tokens=4).choices[0].text


def test_top_k_is_applied_not_dropped(live):
    """top_k 1 samples the most likely token at any temperature: greedy."""
    client = OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    greedy = client.completions.create(model="story", prompt="hello", max_tokens=12).choices[0].text
    for seed in (1, 2, 3):
        sampled = client.completions.create(model="story", prompt="hello", max_tokens=12, temperature=1.0, seed=seed,
                                            extra_body={"top_k": 1})  # fmt: skip
        assert sampled.choices[0].text == greedy


def test_the_routing_header_must_name_the_model(live):
    """X-Ptserve-Task is what nginx hashes on (deploy/nginx.conf); the server checks it."""
    body = {"model": "story", "prompt": "hello", "max_tokens": 4}
    plain = httpx.post(f"{live.url}/v1/completions", json=body, timeout=60)
    same = httpx.post(f"{live.url}/v1/completions", json=body, headers={"X-Ptserve-Task": "story"}, timeout=60)
    assert plain.status_code == same.status_code == 200
    assert same.json()["choices"] == plain.json()["choices"]
    other = httpx.post(f"{live.url}/v1/completions", json=body, headers={"X-Ptserve-Task": "other"}, timeout=60)
    assert other.status_code == 400
    said = "header X-Ptserve-Task is 'other' but model is 'story'; they must be equal"
    assert other.json()["detail"] == said and other.json()["error"]["message"] == said  # OpenAI's clients show it
