"""Faults and hostile input (issue 10): values that break the maths, input that
used to make a 500, artifacts that were accepted but unusable, and special-token
text in request data. Each case names the one status and the words it expects."""

import json
import struct

import httpx
import pytest
import torch
from safetensors.torch import save

from prompt_store.artifact import artifact_bytes
from prompt_store.errors import ArtifactError
from prompt_store.template import render
from ptcore.errors import InvalidRequest
from ptcore.model import load_model
from ptcore.task_prompt import TaskPrompt, task_prompt
from server.api.app import create_app
from server.engine.request import Request, SamplingParams
from server.settings import Settings
from tests.helpers import LiveServer, drive, make_scheduler, oracle_tokens, random_prompt

LABELS = {"pos": " good", "neg": " bad"}


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return load_model(str(gpt2_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def live(gpt2, tmp_path_factory):
    settings = Settings(model=str(gpt2.info["name_or_path"]), store=str(tmp_path_factory.mktemp("store")))
    with LiveServer(create_app(settings, gpt2)) as server:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            assert (
                c.put("/v1/tasks/gen", content=artifact_bytes(random_prompt(gpt2, "[P:2]{input}"))).status_code == 201
            )
            cls = random_prompt(gpt2, "[P:2]{input}[P:1] It was", "classify", LABELS)
            assert c.put("/v1/tasks/cls", content=artifact_bytes(cls)).status_code == 201
        yield server


@pytest.fixture
def client(live):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def meta(loaded, **over) -> dict:
    m = {"format_version": 1, "task_type": "generate", "template": "[P:2]{input}", "base_model": loaded.info}
    m.update(over)
    return m


def raw_artifact(rows: torch.Tensor, meta_text: str) -> bytes:
    return save({"prompt_embeddings": rows}, metadata={"ptserve": meta_text})


def good_rows(loaded, m=2) -> torch.Tensor:
    return random_prompt(loaded, f"[P:{m}]{{input}}").embeddings


def post_json_text(client, url: str, text: str) -> httpx.Response:
    """A body sent as written: JSON escapes such as "\\ud800" reach the server unchanged."""
    return client.post(url, content=text.encode(), headers={"content-type": "application/json"})


def assert_refused(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    for word in words:
        assert word in str(detail), (word, detail)


# -- item 4: values that break the maths ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [1e38, "max"])  # float32's max is 3.4e38, bfloat16's 3.39e38
def test_rows_far_outside_the_embedding_norms_are_refused_at_upload(client, gpt2, value, dtype):
    H = gpt2.info["hidden_size"]
    rows = torch.full((2, H), torch.finfo(dtype).max if value == "max" else value).to(dtype)
    assert torch.isfinite(rows).all()
    for task_type, labels in (("generate", None), ("classify", LABELS)):
        body = meta(gpt2, task_type=task_type, **({"labels": labels} if labels else {}))
        r = client.put("/v1/tasks/huge", content=raw_artifact(rows, json.dumps(body)))
        assert_refused(r, 422, "prompt_embeddings", "row 0", "norm", "1000 ×")
    assert client.get("/v1/tasks/huge").status_code == 404


def test_rows_that_overflow_a_float16_server_are_refused(gpt2_dir, gpt2):
    half = load_model(str(gpt2_dir), device="cpu", dtype="float16")
    artifact = random_prompt(half, "[P:2]{input}")  # float32 rows; the fingerprint of the float16 weights
    task_prompt("fine", 1, artifact, half)  # rows on the embeddings' scale pass
    artifact.embeddings[1, 3] = 1e5
    with pytest.raises(ArtifactError, match=r"overflows float16, the served model's dtype \(largest magnitude 1e\+05"):
        task_prompt("t", 1, artifact, half)


def test_rows_of_a_trained_scale_pass_the_norm_bound(gpt2):
    """The bound is generous: rows 500 times the largest embedding norm still pass."""
    weight = gpt2.model.get_input_embeddings().weight
    largest = float(weight.norm(dim=1).max())
    rows = torch.randn(2, weight.shape[1])
    rows = rows / rows.norm(dim=1, keepdim=True) * largest * 500
    artifact = random_prompt(gpt2, "[P:2]{input}")
    artifact.embeddings.copy_(rows)
    task_prompt("t", 1, artifact, gpt2)


def non_finite_prompt(loaded, task_type: str) -> TaskPrompt:
    """A prompt whose rows make the logits NaN, as if it had slipped past the upload checks."""
    labels = LABELS if task_type == "classify" else None
    prompt = task_prompt("nan", 1, random_prompt(loaded, "[P:2]{input}", task_type, labels), loaded)
    return TaskPrompt(**{**prompt.__dict__, "rows": torch.full_like(prompt.rows, float("inf"))})


@pytest.mark.parametrize("engine", ["continuous", "static"])
def test_non_finite_logits_fail_the_request_not_answer_it(loaded, engine):
    runner = make_scheduler(loaded, engine)
    ids = render(non_finite_prompt(loaded, "generate").template, loaded.tokenizer, {"input": "hi"}, loaded.vocab_size)
    for params in (SamplingParams(4), SamplingParams(4, temperature=1.0, seed=1)):
        good = Request.generate(task_prompt("ok", 1, random_prompt(loaded, "[P:2]{input}"), loaded), ids,
                                SamplingParams(4))  # fmt: skip
        bad = Request.generate(non_finite_prompt(loaded, "generate"), ids, params)
        results = runner.run_to_completion([bad, good])
        assert isinstance(results[0], InvalidRequest) and "NaN or Inf" in str(results[0])
        assert len(results[1].token_ids) == 4  # its batch-mate is unharmed
    results = runner.run_to_completion([Request.classify(non_finite_prompt(loaded, "classify"), ids)])
    assert isinstance(results[0], InvalidRequest) and "NaN or Inf" in str(results[0])


def test_a_slot_that_held_non_finite_values_is_safe_for_the_next_request(loaded):
    """The failed row's keys and values must not reach the next row in its slot:
    masked positions beyond a row's own end are still read (here: a longer
    batch-mate sets how far), and NaN survives the mask."""
    runner = make_scheduler(loaded, "continuous", max_running=2)

    prompt = task_prompt("ok", 1, random_prompt(loaded, "[P:2]{input}"), loaded)

    def ids(text):
        return render(prompt.template, loaded.tokenizer, {"input": text}, loaded.vocab_size)

    text = "the quick brown fox jumps over the lazy dog "
    bad = Request.generate(non_finite_prompt(loaded, "generate"), ids(text * 5), SamplingParams(4))
    assert isinstance(runner.run_to_completion([bad])[0], InvalidRequest)
    # slot 0, where the failed row was; its prefill pads it as far as `longer`, and
    # then `longer`'s decode steps read further, into what the failed row left
    short = Request.generate(prompt, ids("hi"), SamplingParams(4))
    longer = Request.generate(prompt, ids(text), SamplingParams(40))
    assert len(bad.input_ids) > len(longer.input_ids) + 8
    results = runner.run_to_completion([short, longer])
    assert [r.token_ids for r in results] == [oracle_tokens(loaded, short), oracle_tokens(loaded, longer)]

    # the same in slot 1, beside a running row: the slot scrubbed is the failed row's, not row 0's
    runner = make_scheduler(loaded, "continuous", max_running=3)
    first = Request.generate(prompt, ids(text * 3), SamplingParams(30))
    again = [Request.generate(r.prompt, r.input_ids, r.params) for r in (bad, short, longer)]
    results, _ = drive(runner, [first, *again], arrivals=[0, 1, 3, 3])
    assert isinstance(results[1], InvalidRequest)
    assert [r.token_ids for r in (results[0], *results[2:])] == [oracle_tokens(loaded, w) for w in (first, *again[1:])]


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deep_nesting_in_uploads_is_a_422(client, gpt2):
    header = ('{"__metadata__": {"x": ' + nested(10_000) + "}}").encode()
    r = client.put("/v1/tasks/deep", content=struct.pack("<Q", len(header)) + header)
    assert_refused(r, 422, "header", "nested more than 32 levels")
    for depth in (10_000, 900):  # RecursionError in json, then in the response's serializer
        text = json.dumps(meta(gpt2))[:-1] + ', "extra": ' + nested(depth) + "}"
        r = client.put("/v1/tasks/deep", content=raw_artifact(good_rows(gpt2), text))
        assert_refused(r, 422, "metadata 'ptserve'", "nested more than 32 levels")
    weights = save({"prompt_embeddings": good_rows(gpt2)})
    for config in (nested(10_000), '{"peft_type": "PROMPT_TUNING", "x": ' + nested(100) + "}"):
        files = {"adapter_config": ("adapter_config.json", config.encode()), "adapter_model": ("m", weights)}
        assert_refused(client.put("/v1/tasks/deep/peft", files=files), 422, "adapter_config.json", "nested more")
    assert client.get("/v1/tasks/deep").status_code == 404


def test_a_pseudo_token_count_of_5000_digits_is_a_422(client, gpt2):
    text = json.dumps(meta(gpt2, template="[P:" + "7" * 5000 + "]{input}"))
    r = client.put("/v1/tasks/digits", content=raw_artifact(good_rows(gpt2), text))
    assert_refused(r, 422, "bad template", "[P:77777777...]", "at most 10000")


@pytest.mark.parametrize(
    "url, body, words",
    [
        ("/v1/tasks/gen/generate", '{"input": "a\\ud800b"}', ["field 'input'", "lone surrogate '\\ud800'"]),
        ("/v1/tasks/gen/generate", '{"inputs": {"input": "\\udfff"}}', ["field 'input'", "lone surrogate"]),
        ("/v1/tasks/gen/generate", '{"input": "\\ud800", "stream": true}', ["field 'input'", "lone surrogate"]),
        ("/v1/tasks/gen/generate", '{"input": "x", "stop": ["\\ud800"]}', ["stop", "lone surrogate"]),
        ("/v1/tasks/cls/classify", '{"input": "\\ud800"}', ["field 'input'", "lone surrogate"]),
        ("/v1/completions", '{"model": "gen", "prompt": "\\ud800"}', ["field 'input'", "lone surrogate"]),
        ("/v1/completions", '{"model": "gen", "prompt": "x", "stream": true, "stop": "\\ud800"}', ["stop"]),
        # pydantic's own errors quote the input: the answer must still encode
        ("/v1/tasks/gen/generate", '{"input": "\\ud800", "inputs": {"a": "b"}}', ["exactly one"]),
        ("/v1/tasks/gen/generate", '{"input": "x", "top_k": "\\ud800"}', ["top_k", "\\ud800"]),
    ],
)
def test_a_lone_surrogate_in_a_request_is_a_422(client, url, body, words):
    assert_refused(post_json_text(client, url, body), 422, *words)


@pytest.mark.parametrize(
    "over",
    [
        {"template": "[P:2]\ud800{input}"},
        {"task_type": "classify", "labels": {"pos": "\ud800", "neg": " bad"}},
        {"task_type": "classify", "labels": {"\ud800": " good", "neg": " bad"}},
        {"description": "\ud800"},
    ],
)
def test_a_lone_surrogate_in_an_uploaded_artifact_is_a_422(client, gpt2, over):
    r = client.put("/v1/tasks/surrogate", content=raw_artifact(good_rows(gpt2), json.dumps(meta(gpt2, **over))))
    assert_refused(r, 422, "metadata 'ptserve'", "lone surrogate '\\ud800'")


def test_a_vanishing_top_p_keeps_the_top_token(loaded, client):
    """top_p = 1e-46 rounds to 0 in float32: the nucleus is then the top token alone, i.e. greedy."""
    runner = make_scheduler(loaded)
    prompt = task_prompt("t", 1, random_prompt(loaded, "[P:3]{input}[P:1]", seed=3), loaded)
    ids = render(prompt.template, loaded.tokenizer, {"input": "hello world"}, loaded.vocab_size)
    greedy, tiny = runner.run_to_completion([
        Request.generate(prompt, ids, SamplingParams(10)),
        Request.generate(prompt, ids, SamplingParams(10, temperature=1.0, top_p=1e-46, seed=5)),
    ])  # fmt: skip
    assert tiny.token_ids == greedy.token_ids and len(greedy.token_ids) > 0
    body = {"input": "hello", "max_new_tokens": 5}
    want = client.post("/v1/tasks/gen/generate", json=body).json()["token_ids"]
    r = client.post("/v1/tasks/gen/generate", json={**body, "temperature": 1.0, "top_p": 1e-46, "seed": 1})
    assert r.status_code == 200 and r.json()["token_ids"] == want


# -- item 14: accepted but unusable artifacts ---------------------------------------


@pytest.mark.parametrize(
    "over, words",
    [
        ({"format_version": True}, ["format_version must be the integer 1", "True"]),
        ({"format_version": 1.0}, ["format_version must be the integer 1", "1.0"]),
        ({"template": "[P:1]{0}[P:1]"}, ["bad template", "field {0}", "letters, digits and _"]),
        ({"template": "{input.__dict__}[P:2]"}, ["bad template", "field {input.__dict__}", "no attribute or index"]),
        ({"template": "{input[P:2]"}, ["bad template", "unbalanced '{' at index 0", "{{"]),
        ({"template": "[P:2]{input}}"}, ["bad template", "unbalanced '}' at index 12"]),
        ({"generation": {"max_new_tokens": 1000}}, ["generation", "max_new_tokens 1000", "512 positions"]),
        (
            {"task_type": "classify", "labels": {"pos": " good" * 6000, "neg": " bad"}},
            ["label 'pos': verbalizer is", "after the template's own 2 tokens the model's 512 positions"],
        ),
    ],
)
def test_unusable_artifacts_are_refused_at_upload(client, gpt2, over, words):
    r = client.put("/v1/tasks/unusable", content=raw_artifact(good_rows(gpt2), json.dumps(meta(gpt2, **over))))
    assert_refused(r, 422, *words)
    assert client.get("/v1/tasks/unusable").status_code == 404


def test_literal_braces_are_written_doubled(client, gpt2):
    a = random_prompt(gpt2, '[P:2]{{"text": "{input}"}}', generation={"max_new_tokens": 500})
    r = client.put("/v1/tasks/braces", content=artifact_bytes(a))
    assert r.status_code == 201, r.text
    r = client.post("/v1/tasks/braces/generate", json={"input": "x", "max_new_tokens": 2})
    assert r.status_code == 200 and len(r.json()["token_ids"]) == 2


# -- item 15: special-token text in request data -------------------------------------


def test_special_token_text_in_a_field_is_plain_text(loaded):
    tok, V = loaded.tokenizer, loaded.vocab_size
    specials = {tok.eos_token_id, tok.bos_token_id, tok.pad_token_id}
    assert len(specials) == 3
    prompt = task_prompt("t", 1, random_prompt(loaded, "[P:2]{input}"), loaded)
    ids = render(prompt.template, tok, {"input": "a</s><s><pad>b"}, V)
    assert not specials & set(ids), ids
    assert tok.decode(ids[2:]) == "a</s><s><pad>b"
    literal = render(task_prompt("t", 1, random_prompt(loaded, "[P:2]{input}</s>"), loaded).template, tok,
                     {"input": "a"}, V)  # fmt: skip
    assert literal[-1] == tok.eos_token_id  # the template's author wrote it: it stays special


def test_special_token_text_in_a_completion_prompt_is_text(client, gpt2):
    """Before, the prompt "</s>" was one token, the EOS id; now it is tokenized as text."""
    as_text = gpt2.tokenizer("</s>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert len(as_text) > 1 and gpt2.tokenizer.eos_token_id not in as_text
    r = client.post("/v1/completions", json={"model": "gen", "prompt": "</s>", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 2 + len(as_text)
