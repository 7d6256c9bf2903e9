"""The real default model (SmolLM2-135M-Instruct, dequantized from its GGUF),
in float32 on the CPU: it knows things, and the real server reproduces the
oracle on it token for token, as on the tiny models."""

import asyncio
from pathlib import Path

import httpx
import torch

from prompt_store.artifact import artifact_bytes
from prompt_store.template import render
from ptcore.model_source import DEFAULT_MODEL, resolve_model
from server.api.app import create_app
from server.settings import Settings
from tests.helpers import LiveServer, alone_greedy, alone_label_scores, random_prompt


def greedy(loaded, text, n):
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    no_rows = torch.empty(0, loaded.info["hidden_size"])
    return alone_greedy(loaded.model, no_rows, ids, loaded.vocab_size, n, loaded.eos_token_ids)


def test_it_is_the_pinned_model(smollm2, default_model_dir):
    config = smollm2.model.config
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 576, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, smollm2.vocab_size) == (9, 3, 49152)
    assert default_model_dir.endswith(DEFAULT_MODEL.sha256)
    # artifacts and the API name it as users know it, never by the cache folder (a path on this machine)
    assert smollm2.info["name_or_path"] == "SmolLM2-135M-Instruct"
    assert smollm2.info["source_sha256"] == DEFAULT_MODEL.sha256


def test_an_artifact_names_the_default_model_so_any_machine_finds_it(smollm2, model_cache, default_model_dir):
    """`ptserve export-peft` and PEFT imports load the model an artifact names:
    its name and source sha256 find the converted checkpoint; the name alone, the default model."""
    info = smollm2.info
    assert resolve_model(info["name_or_path"], model_cache.root, info["source_sha256"]) == default_model_dir
    assert resolve_model(info["name_or_path"], model_cache.root) == default_model_dir


def test_greedy_knows_capitals(smollm2):
    france = greedy(smollm2, "The capital of France is", 4)
    assert france == [7042, 30, 198, 198]  # observed in float32 on the CPU
    assert smollm2.tokenizer.decode(france).startswith(" Paris.")
    assert "Tokyo" in smollm2.tokenizer.decode(greedy(smollm2, "The capital of Japan is", 3))


def test_a_second_resolve_comes_from_the_cache(model_cache, default_model_dir, monkeypatch):
    """No pip, no conversion: with no package index at all it still resolves."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setattr(model_cache, "convert", None)  # would fail if called
    assert resolve_model(None, model_cache.root) == default_model_dir


GEN_TASKS = {
    "continue": ("[P:3]{input}[P:3]", 1),
    "answer": ("Question: {input}[P:4] Answer:", 2),
}
CLS_TASKS = {
    "sentiment": ("[P:2] Review: {input} [P:2] It was", {"positive": " good", "negative": " bad thing"}, 3),
    "topic": ("{input}[P:5] Topic:", {"geo": " geography", "food": " food", "code": " programming"}, 4),
}
TEXTS = ["The capital of France is", "I loved this film", "pasta with tomato sauce", "a for loop in Python"]


def test_http_mixed_requests_equal_the_oracle(smollm2, default_model_dir, tmp_path):
    settings = Settings(
        model=default_model_dir, store=str(tmp_path / "store"), max_wait_ms=50, max_running=8, max_seq_len=128
    )
    artifacts = {task: random_prompt(smollm2, t, seed=seed) for task, (t, seed) in GEN_TASKS.items()}
    for task, (t, labels, seed) in CLS_TASKS.items():
        artifacts[task] = random_prompt(smollm2, t, "classify", labels, seed=seed)
    requests = []  # (task, route, text, max_new_tokens)
    for i, text in enumerate(TEXTS * 2):
        task = [*GEN_TASKS, *CLS_TASKS][i % 4]
        requests.append((task, "generate" if task in GEN_TASKS else "classify", text, 3 + i % 4))

    async def fire(url):
        async with httpx.AsyncClient(base_url=url, timeout=120) as ac:
            calls = []
            for task, route, text, n in requests:
                body = {"input": text, **({"max_new_tokens": n} if route == "generate" else {})}
                calls.append(ac.post(f"/v1/tasks/{task}/{route}", json=body))
            return await asyncio.gather(*calls)

    with LiveServer(create_app(settings, smollm2)) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        for task, a in artifacts.items():
            assert client.put(f"/v1/tasks/{task}", content=artifact_bytes(a)).status_code == 201
        responses = asyncio.run(fire(live.url))
        batches = client.get("/v1/stats").json()["batches"]

    V, eos = smollm2.vocab_size, smollm2.eos_token_ids
    for (task, route, text, n), r in zip(requests, responses):
        assert r.status_code == 200, r.text
        a = artifacts[task]
        ids = render(a.template, smollm2.tokenizer, {"input": text}, V)
        if route == "generate":
            assert r.json()["token_ids"] == alone_greedy(smollm2.model, a.embeddings, ids, V, n, eos), (task, text)
        else:
            label_ids = [smollm2.tokenizer(v, add_special_tokens=False)["input_ids"] for v in a.labels.values()]
            expected = alone_label_scores(smollm2.model, a.embeddings, ids, V, label_ids)
            got = r.json()["scores"]
            assert list(got) == list(a.labels)
            assert max(abs(x - y) for x, y in zip(got.values(), expected)) < 1e-5, (task, text)
    assert batches["requests"] == len(requests) and batches["max_batch_size_seen"] > 1, batches


def test_the_example_tasks_answer_through_http(smollm2, default_model_dir, tmp_path):
    """The README's first command: the default model with examples/prompts preloaded.
    Its curls' answers, exactly (float32, greedy)."""
    examples = Path(__file__).resolve().parents[2] / "examples" / "prompts"
    settings = Settings(model=default_model_dir, store=str(tmp_path / "store"), preload=str(examples))
    with LiveServer(create_app(settings, smollm2)) as live, httpx.Client(base_url=live.url, timeout=120) as client:
        assert sorted(t["task_id"] for t in client.get("/v1/tasks").json()) == ["dates", "language", "sentiment"]
        sentence = "We moved the launch party to Friday, 14 November, because the venue flooded."
        r = client.post("/v1/tasks/dates/generate", json={"input": sentence})
        assert r.status_code == 200 and r.json()["text"] == " November 14" and r.json()["finish_reason"] == "stop"
        review = "The battery died after two days and support never answered."
        r = client.post("/v1/tasks/sentiment/classify", json={"input": review})
        assert r.status_code == 200 and r.json()["label"] == "negative"
