"""A hand-written prompt run with no stored prompt (server/handwritten.py,
POST /v1/handwritten/*): its answers are those of a stored task whose rows are
the hand-written words' own embeddings (what `--from-prompt` starts from)."""

import httpx
import pytest
import torch

from prompt_store.artifact import artifact_bytes, make_artifact
from prompt_store.template import tokenize_text
from server.handwritten import TASK_ID, HandWritten, handwritten_prompt
from tests.helpers import live_server

MANUAL = "Question: what is {input}? Answer:"
LABELS = {"yes": " yes", "no": " no"}


def words_artifact(loaded, task_type, labels=None):
    """The stored-task twin: [P:k] holes whose rows are the words' token embeddings."""
    runs = ["Question: what is ", "? Answer:"]  # the template's literal parts, as written
    ids = [tokenize_text(loaded.tokenizer, run) for run in runs]
    weight = loaded.model.get_input_embeddings().weight
    rows = weight[ids[0] + ids[1]].detach().float()
    template = f"[P:{len(ids[0])}]{{input}}[P:{len(ids[1])}]"
    return make_artifact(rows, template=template, task_type=task_type, labels=labels, base_model=loaded.info)


def test_the_rows_are_the_words_own_embeddings(gpt2):
    prompt = handwritten_prompt(HandWritten(MANUAL, "generate"), gpt2, max_labels=256, max_rows=512)
    twin = words_artifact(gpt2, "generate")
    assert prompt.template.source == twin.meta["template"]
    assert torch.equal(prompt.rows.float(), twin.embeddings)
    assert prompt.task_id == TASK_ID and prompt.version == 0


def test_answers_equal_the_stored_twins_and_bad_prompts_are_422(gpt2, tmp_path):
    with live_server(gpt2, str(tmp_path), max_labels=2) as server:
        for task, artifact in (("gen", words_artifact(gpt2, "generate")),
                               ("cls", words_artifact(gpt2, "classify", LABELS))):  # fmt: skip
            assert httpx.put(f"{server.url}/v1/tasks/{task}", content=artifact_bytes(artifact)).status_code == 201
        body = {"input": "json parse", "max_new_tokens": 8}
        hand = httpx.post(f"{server.url}/v1/handwritten/generate", json={**body, "template": MANUAL}).json()
        stored = httpx.post(f"{server.url}/v1/tasks/gen/generate", json=body).json()
        assert (hand["token_ids"], hand["text"], hand["task_id"]) == (stored["token_ids"], stored["text"], TASK_ID)
        streamed = httpx.post(f"{server.url}/v1/handwritten/generate",
                              json={**body, "template": MANUAL, "stream": True}).text  # fmt: skip
        assert '"done": true' in streamed and streamed.endswith("data: [DONE]\n\n")
        hand = httpx.post(f"{server.url}/v1/handwritten/classify",
                          json={"input": "a cat", "template": MANUAL, "labels": LABELS}).json()  # fmt: skip
        stored = httpx.post(f"{server.url}/v1/tasks/cls/classify", json={"input": "a cat"}).json()
        assert hand["scores"] == pytest.approx(stored["scores"], rel=1e-6) and hand["label"] == stored["label"]
        for extra, words in [
            ({"template": "[P:2]{input}"}, "a hand-written template has words and {fields} only, no [P:n]"),
            ({"template": "no field here"}, "the template has no field such as {input}"),
            ({"template": "{input"}, "template: "),
        ]:
            r = httpx.post(f"{server.url}/v1/handwritten/generate", json={"input": "x", **extra})
            assert r.status_code == 422 and r.json()["detail"].startswith(words), r.text
        r = httpx.post(f"{server.url}/v1/handwritten/classify",
                       json={"input": "x", "template": MANUAL, "labels": {"yes": ""}})  # fmt: skip
        assert r.status_code == 422 and "verbalizer" in r.text
        r = httpx.post(f"{server.url}/v1/handwritten/classify", json={"input": "x", "template": MANUAL})
        assert r.status_code == 422  # labels are required
        many = {"input": "x", "template": MANUAL, "labels": {"a": " a", "b": " b", "c": " c"}}  # the upload limits hold
        r = httpx.post(f"{server.url}/v1/handwritten/classify", json=many)
        assert r.status_code == 422 and r.json()["detail"] == "3 labels; this server allows at most 2"
        r = httpx.post(f"{server.url}/v1/handwritten/generate", json={"input": "x", "template": "{input}"})
        assert r.status_code == 422 and r.json()["detail"] == "the template has no words besides its fields"
        huge = "word " * 20_000 + "{input}"  # 100,007 characters, and the input's 1: refused before tokenizing
        r = httpx.post(f"{server.url}/v1/handwritten/generate", json={"input": "x", "template": huge})
        assert r.status_code == 422 and r.json()["detail"].startswith("input is 100008 characters; the limit is")
