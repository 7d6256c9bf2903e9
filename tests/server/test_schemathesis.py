"""Property-based requests generated from the server's own /openapi.json: whatever
the input, the answer is never a 5xx. Input classes a schema does not describe
(lone surrogates, special-token text, deep nesting, huge numbers, hostile
artifacts) are drawn by the Hypothesis strategies below."""

import json
import math

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from prompt_store.artifact import artifact_bytes
from ptcore.model import load_model
from server.api.app import create_app
from server.settings import Settings
from tests.helpers import LiveServer, random_prompt

# every operation the schema publishes (GET /openapi.json and /docs are not in it)
API = [
    ("DELETE", "/v1/files/{file_id}"),
    ("DELETE", "/v1/tasks/{task_id}"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/ready"),
    ("GET", "/v1/files"),
    ("GET", "/v1/files/{file_id}"),
    ("GET", "/v1/files/{file_id}/content"),
    ("GET", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/fine_tuning/jobs/{job_id}"),
    ("GET", "/v1/fine_tuning/jobs/{job_id}/events"),
    ("GET", "/v1/models"),
    ("GET", "/v1/stats"),
    ("GET", "/v1/tasks"),
    ("GET", "/v1/tasks/{task_id}"),
    ("GET", "/v1/tasks/{task_id}/artifact"),
    ("GET", "/v1/tasks/{task_id}/versions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/files"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"),
    ("POST", "/v1/handwritten/classify"),
    ("POST", "/v1/handwritten/generate"),
    ("POST", "/v1/tasks/{task_id}/classify"),
    ("POST", "/v1/tasks/{task_id}/generate"),
    ("PUT", "/v1/tasks/{task_id}"),
    ("PUT", "/v1/tasks/{task_id}/peft"),
]


@pytest.fixture(scope="module")
def live(gpt2_dir, tmp_path_factory):
    loaded = load_model(str(gpt2_dir), device="cpu", dtype="float32")
    # the default max_new_tokens must be within the limit, or task "a" is refused and every request is a 404
    settings = Settings(model=str(gpt2_dir), store=str(tmp_path_factory.mktemp("store")), max_new_tokens_limit=16,
                        default_max_new_tokens=8)  # fmt: skip
    with LiveServer(create_app(settings, loaded)) as server:
        r = httpx.put(f"{server.url}/v1/tasks/a", content=artifact_bytes(random_prompt(loaded, "[P:2]{input}")))
        assert r.status_code == 201, r.text
        labels = {"pos": " good", "neg": " bad"}
        classify = random_prompt(loaded, "[P:2]{input}[P:1] It was", "classify", labels)
        assert httpx.put(f"{server.url}/v1/tasks/c", content=artifact_bytes(classify)).status_code == 201
        server.loaded = loaded
        yield server


def test_no_input_makes_a_5xx(live):
    """schemathesis builds the requests from the schema; Hypothesis runs each
    operation. (Its pytest plugin does not work with pytest 9, hence the loop.)"""
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert sorted((op.method.upper(), op.path) for op in operations) == API

    for operation in operations:
        check_operation(operation, existing_task=False)
    for operation in operations:
        if operation.method.upper() == "POST":  # random bodies against a task that exists: they reach the engine
            check_operation(operation, existing_task=True)


def check_operation(operation, existing_task: bool) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        if existing_task:
            if case.path_parameters and "task_id" in case.path_parameters:
                case.path_parameters["task_id"] = "a"
            if isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "a"
        response = case.call(timeout=60)
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
        )

    check()


# -- input classes that schemathesis does not draw ----------------------------------

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# text: lone surrogates (valid JSON escapes, but no UTF-8), special-token strings, template syntax
HOSTILE_TEXT = st.one_of(
    st.sampled_from(
        ["\ud800", "a\udfffb", "</s>", "<s>", "<pad>", "x</s>y", "[MASK]", "{input}", "{0}", "}{", "[P:3]"]
    ),
    st.text(st.characters(categories=["Cs", "Lu", "Ll", "Zs", "Po", "Ps", "Pe", "Cc"]), max_size=12),
)
# JSON fragments written raw into a body or a document: nesting far past any parser's recursion limit
DEEP = st.sampled_from([10, 33, 900, 10_000]).map(nested)
TINY_FLOATS = st.sampled_from([1e-46, 5e-324, 1e-300, 1e-38, 0.5, 1.0])


def body_text(fields: dict, raw: dict) -> str:
    """JSON with surrogates escaped as "\\ud800" (as a client sends them) and `raw` fragments as written."""
    text = json.dumps(fields, ensure_ascii=True)
    for key, fragment in raw.items():
        text = text[:-1] + f', "{key}": {fragment}}}'
    return text


def assert_no_5xx(r: httpx.Response, what) -> None:
    assert r.status_code < 500, (what, r.status_code, r.text[:300])
    assert "internal error" not in r.text, (what, r.text[:300])  # also inside a 200 event stream


@pytest.mark.parametrize(
    "url, task",
    [
        ("/v1/tasks/a/generate", {}),
        ("/v1/tasks/c/classify", {}),
        ("/v1/completions", {"model": "a"}),
    ],
)
def test_hostile_request_values_make_no_5xx(live, url, task):
    """Surrogates, special-token text, deep nesting and vanishing top_p in every request field."""
    completions = "model" in task

    deep_field = st.tuples(st.sampled_from(["input", "stop", "top_p"]), DEEP)

    @given(text=HOSTILE_TEXT, stop=st.none() | HOSTILE_TEXT, top_p=st.none() | TINY_FLOATS,
           stream=st.booleans(), deep=st.none() | deep_field)  # fmt: skip
    @example(text="a\ud800", stop=None, top_p=None, stream=False, deep=None)  # each class at least once
    @example(text="\udfff", stop=None, top_p=None, stream=True, deep=None)
    @example(text="</s>", stop="\ud800", top_p=None, stream=False, deep=None)
    @example(text="x", stop=None, top_p=1e-46, stream=False, deep=None)
    @example(text="x", stop=None, top_p=None, stream=False, deep=("input", nested(10_000)))
    @PROPERTY
    def check(text, stop, top_p, stream, deep):
        fields = {**task, ("prompt" if completions else "input"): text}
        if "classify" not in url:
            fields.update({"stream": stream, "seed": 1, "temperature": 1.0} if top_p else {"stream": stream})
            fields.update({k: v for k, v in {"stop": stop, "top_p": top_p}.items() if v is not None})
            fields["max_tokens" if completions else "max_new_tokens"] = 3
        raw = {}
        if deep is not None:
            key, fragment = deep
            fields.pop(key, None)
            raw[key] = fragment
        body = body_text(fields, raw)
        r = httpx.post(live.url + url, content=body.encode(), headers={"content-type": "application/json"}, timeout=60)
        assert_no_5xx(r, body[:200])
        if r.status_code == 200 and "classify" in url:
            assert all(isinstance(p, float) and math.isfinite(p) for p in r.json()["scores"].values()), r.text

    check()


def test_hostile_artifacts_make_no_5xx(live):
    """Uploads whose metadata nests deeply or holds surrogates, templates with bad holes,
    rows that break the maths, verbalizers and defaults that cannot fit; and, when one
    is accepted, requests against it."""
    loaded = live.loaded
    H = loaded.info["hidden_size"]

    @given(template=st.sampled_from(["[P:2]{input}", "[P:1]{input}[P:1]", "[P:2]{0}", "{input.x}[P:2]", "{input[P:2]",
                                     "[P:" + "7" * 5000 + "]", "[P:2]</s>{input}", "[P:2]{{x}}{input}"]) | HOSTILE_TEXT,
           task_type=st.sampled_from(["generate", "classify"]), verbalizer=HOSTILE_TEXT | st.just(" good" * 3000),
           format_version=st.sampled_from([1, True, 1.0, "1", None]), scale=st.sampled_from([1.0, 1e5, 1e38, 3.4e38]),
           dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
           max_new_tokens=st.none() | st.sampled_from([1, 509, 1000, 10**6]), deep=st.none() | DEEP,
           text=HOSTILE_TEXT)  # fmt: skip
    @example(
        template="[P:2]{input}",
        task_type="generate",
        verbalizer="",
        format_version=1,
        scale=1.0,
        dtype=torch.float32,
        max_new_tokens=None,
        deep=nested(10_000),
        text="x",
    )  # each class at least once
    @example(
        template="[P:2]\ud800{input}",
        task_type="classify",
        verbalizer="\ud800",
        format_version=1,
        scale=1.0,
        dtype=torch.float32,
        max_new_tokens=None,
        deep=None,
        text="x",
    )
    @example(
        template="[P:" + "7" * 5000 + "]{input}",
        task_type="generate",
        verbalizer="",
        format_version=True,
        scale=1.0,
        dtype=torch.float32,
        max_new_tokens=1000,
        deep=None,
        text="\ud800",
    )
    @example(
        template="[P:2]{input}",
        task_type="classify",
        verbalizer=" good",
        format_version=1,
        scale=3.4e38,
        dtype=torch.bfloat16,
        max_new_tokens=None,
        deep=None,
        text="x",
    )
    @PROPERTY
    def check(template, task_type, verbalizer, format_version, scale, dtype, max_new_tokens, deep, text):
        meta = {"format_version": format_version, "task_type": task_type, "template": template,
                "base_model": loaded.info}  # fmt: skip
        if task_type == "classify":
            meta["labels"] = {"pos": verbalizer, "neg": " bad"}
        if max_new_tokens is not None:
            meta["generation"] = {"max_new_tokens": max_new_tokens}
        rows = (torch.randn(2, H) * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
        document = body_text(meta, {} if deep is None else {"extra": deep})
        r = httpx.put(f"{live.url}/v1/tasks/h", content=save({"prompt_embeddings": rows}, {"ptserve": document}))
        assert_no_5xx(r, document[:200])
        if r.status_code == 201:
            route = "generate" if task_type == "generate" else "classify"
            body = body_text({"input": text}, {})
            answer = httpx.post(f"{live.url}/v1/tasks/h/{route}", content=body.encode(),
                                headers={"content-type": "application/json"}, timeout=60)  # fmt: skip
            assert_no_5xx(answer, (document[:200], body[:200]))

    check()


def test_hostile_peft_configs_make_no_5xx(live):
    weights = save({"prompt_embeddings": torch.randn(2, live.loaded.info["hidden_size"])})

    @given(deep=DEEP, where=st.sampled_from(["top", "value"]), text=HOSTILE_TEXT)
    @PROPERTY
    def check(deep, where, text):
        config = deep if where == "top" else body_text({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2,
                                                        "base_model_name_or_path": text}, {"x": deep})  # fmt: skip
        files = {"adapter_config": ("adapter_config.json", config.encode()), "adapter_model": ("m", weights)}
        assert_no_5xx(httpx.put(f"{live.url}/v1/tasks/p/peft", files=files, timeout=60), config[:200])

    check()
