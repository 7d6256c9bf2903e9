import json
import struct

import pytest
import torch
from safetensors.torch import save

from prompt_store.artifact import (
    artifact_bytes,
    check_fits_model,
    load_artifact,
    make_artifact,
    read_artifact,
    save_artifact,
)
from prompt_store.errors import ArtifactError
from ptcore.errors import PayloadTooLarge

BASE = {"name_or_path": "tiny", "hidden_size": 8, "vocab_size": 100, "fingerprint": "abc"}


def artifact(rows=6, template="[P:3]{input}[P:3]", dtype=torch.float32, **kw):
    return make_artifact(torch.randn(rows, 8).to(dtype), template=template, task_type="generate", base_model=BASE, **kw)


def raw(tensors: dict, meta: dict | None) -> bytes:
    return save(tensors, metadata=None if meta is None else {"ptserve": json.dumps(meta)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip(tmp_path, dtype):
    a = artifact(dtype=dtype, description="d", generation={"max_new_tokens": 5})
    save_artifact(a, tmp_path / "a.safetensors")
    b = load_artifact(tmp_path / "a.safetensors")
    # exact: the same numbers written and read back, nothing computed
    assert torch.equal(a.embeddings, b.embeddings) and b.embeddings.dtype == dtype
    assert b.meta["description"] == "d" and b.task_type == "generate" and b.template.num_virtual_tokens == 6


def test_unknown_metadata_keys_are_kept():
    a = artifact(something_new={"x": 1})
    assert read_artifact(artifact_bytes(a)).meta["something_new"] == {"x": 1}


def meta(**over):
    m = {"format_version": 1, "task_type": "generate", "template": "[P:2]{input}", "base_model": BASE}
    m.update(over)
    return {k: v for k, v in m.items() if v is not None}


@pytest.mark.parametrize(
    "data, message",
    [
        (b"hello", "not a safetensors file"),
        (struct.pack("<Q", 10**12) + b"{}", "header length"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (raw({"other": torch.zeros(2, 8)}, meta()), "no tensor named 'prompt_embeddings'"),
        (raw({"prompt_embeddings": torch.zeros(2, 8)}, None), "no 'ptserve' key"),
        (raw({"prompt_embeddings": torch.zeros(3, 8)}, meta()), "3 rows but template"),
        (raw({"prompt_embeddings": torch.zeros(2, 8, 1)}, meta()), "must be 2-D"),
        (raw({"prompt_embeddings": torch.zeros(2, 8, dtype=torch.int32)}, meta()), "float32, float16 or bfloat16"),
        (raw({"prompt_embeddings": torch.full((2, 8), float("nan"))}, meta()), "NaN or Inf"),
        (raw({"prompt_embeddings": torch.full((2, 8), float("inf"))}, meta()), "NaN or Inf"),
        (raw({"prompt_embeddings": torch.zeros(2, 8)}, meta(task_type="translate")), "task_type must be one of"),
        (raw({"prompt_embeddings": torch.zeros(2, 8)}, meta(task_type="classify")), "needs 'labels'"),
        (raw({"prompt_embeddings": torch.zeros(2, 8)}, meta(format_version=2)), "format_version"),
        (raw({"prompt_embeddings": torch.zeros(2, 8)}, meta(base_model={"hidden_size": 8})), "vocab_size"),
        (raw({"prompt_embeddings": torch.zeros(2, 4)}, meta()), "base_model.hidden_size is 8"),
        (raw({"prompt_embeddings": torch.zeros(2, 8)}, meta(template="[P:0]")), "bad template"),
    ],
)
def test_bad_artifacts_say_what_is_wrong(data, message):
    with pytest.raises(ArtifactError, match=message):
        read_artifact(data)


def test_truncated_file_is_refused():
    data = artifact_bytes(artifact())
    with pytest.raises(ArtifactError):
        read_artifact(data[:-10])


def test_size_limit():
    with pytest.raises(PayloadTooLarge):
        read_artifact(artifact_bytes(artifact()), max_bytes=100)


def test_fits_model_checks():
    a = artifact()
    check_fits_model(a, hidden_size=8, vocab_size=100, fingerprint="abc")
    with pytest.raises(ArtifactError, match="hidden size"):
        check_fits_model(a, hidden_size=16, vocab_size=100, fingerprint="abc")
    with pytest.raises(ArtifactError, match="vocab_size"):
        check_fits_model(a, hidden_size=8, vocab_size=101, fingerprint="abc")
    with pytest.raises(ArtifactError, match="fingerprint"):
        check_fits_model(a, hidden_size=8, vocab_size=100, fingerprint="def")


def header_bytes(header: dict) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob


@pytest.mark.parametrize(
    "header, message",
    [
        ({"__metadata__": "x", "prompt_embeddings": {}}, "'__metadata__' must be an object"),
        ({"__metadata__": {"ptserve": 5}, "prompt_embeddings": {}}, "must be a JSON string"),
    ],
)
def test_malformed_metadata_is_an_artifact_error(header, message):
    with pytest.raises(ArtifactError, match=message):
        read_artifact(header_bytes(header))


def test_a_template_without_pseudo_tokens_is_refused():
    with pytest.raises(ArtifactError, match="no \\[P:n\\] pseudo tokens"):
        make_artifact(torch.zeros(0, 8), template="{input}", task_type="generate", base_model=BASE)


@pytest.mark.parametrize("version", [True, 1.0, "1", 2])
def test_format_version_is_the_integer_1(version):
    with pytest.raises(ArtifactError, match=f"format_version must be the integer 1, got {version!r}"):
        read_artifact(raw({"prompt_embeddings": torch.zeros(2, 8)}, meta(format_version=version)))


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_is_refused():
    deep_header = ('{"__metadata__": {"x": ' + nested(10_000) + "}}").encode()
    with pytest.raises(ArtifactError, match="header is nested more than 32 levels deep"):
        read_artifact(struct.pack("<Q", len(deep_header)) + deep_header)
    for depth in (10_000, 33):
        text = json.dumps(meta())[:-1] + ', "x": ' + nested(depth) + "}"
        data = save({"prompt_embeddings": torch.zeros(2, 8)}, metadata={"ptserve": text})
        with pytest.raises(ArtifactError, match="metadata 'ptserve' is nested more than 32 levels deep"):
            read_artifact(data)
    text = json.dumps(meta())[:-1] + ', "x": ' + nested(31) + "}"  # 32 levels with the document itself
    read_artifact(save({"prompt_embeddings": torch.zeros(2, 8)}, metadata={"ptserve": text}))


@pytest.mark.parametrize("over", [{"template": "[P:2]\ud800"}, {"description": "x\udc00"}, {"labels": {"\ud800": "y"}}])
def test_lone_surrogates_in_metadata_are_refused(over):
    text = json.dumps(meta(task_type="classify", labels={"a": "b"}) | over).replace("\\\\", "\\")
    with pytest.raises(ArtifactError, match=r"metadata 'ptserve' holds a lone surrogate '\\ud[8c]00'"):
        read_artifact(save({"prompt_embeddings": torch.zeros(2, 8)}, metadata={"ptserve": text}))


def test_rows_must_fit_the_served_dtype_and_norms():
    a = artifact()
    a.embeddings.copy_(torch.ones(6, 8))  # every row has norm sqrt(8) = 2.83
    check_fits_model(a, 8, 100, "abc", dtype=torch.float16, embedding_norm=0.003)
    with pytest.raises(ArtifactError, match=r"row 0 has norm 2.83, more than 1000 × .* embedding rows \(0.002\)"):
        check_fits_model(a, 8, 100, "abc", dtype=torch.float32, embedding_norm=0.002)
    a.embeddings[2, 1] = 7e4
    with pytest.raises(ArtifactError, match=r"overflows float16, the served model's dtype \(largest magnitude 7e\+04"):
        check_fits_model(a, 8, 100, "abc", dtype=torch.float16, embedding_norm=1e9)


def test_booleans_are_not_sizes():
    with pytest.raises(ArtifactError, match="hidden_size"):
        make_artifact(
            torch.zeros(2, 8), template="[P:2]", task_type="generate", base_model={**BASE, "hidden_size": True}
        )
