"""TaskManager, without HTTP: uploads are checked against the served model before
anything is stored; reads and deletes of a missing task raise TaskNotFound."""

import pytest
from safetensors.torch import load_file

from prompt_store.artifact import artifact_bytes, read_artifact
from prompt_store.errors import InvalidTaskId
from ptcore.errors import InvalidRequest, TaskNotFound
from ptcore.model import default_bos_token
from server.build import build_engine
from server.settings import Settings
from tests.helpers import make_adapter, random_prompt

LABELS = {"good": " yes", "bad": " no", "meh": " maybe"}


@pytest.fixture
def engine_of(gpt2, tmp_path):
    def build(**settings):
        return build_engine(Settings(model=gpt2.info["name_or_path"], store=str(tmp_path / "store"), **settings), gpt2)

    return build


def generate_bytes(loaded, template="[P:2]{input}[P:2]", **meta) -> bytes:
    return artifact_bytes(random_prompt(loaded, template, **meta))


def test_upload_stores_a_new_version_and_reads_it_back(gpt2, engine_of):
    tasks = engine_of().tasks
    first, second = generate_bytes(gpt2, seed=1), generate_bytes(gpt2, seed=2)
    summary = tasks.upload("g", first)
    assert (summary["task_id"], summary["version"], summary["task_type"]) == ("g", 1, "generate")
    assert (summary["num_virtual_tokens"], summary["template"]) == (4, "[P:2]{input}[P:2]")
    assert tasks.upload("g", first)["version"] == 1  # the same bytes again: no new version
    assert tasks.upload("g", second)["version"] == 2
    assert tasks.summary("g")["version"] == 2
    assert tasks.artifact("g").data == second and tasks.artifact("g").version == 2
    assert [t["task_id"] for t in tasks.list()] == ["g"]


def test_too_many_prompt_rows_is_refused_and_nothing_is_stored(gpt2, engine_of):
    tasks = engine_of(max_virtual_tokens=3).tasks
    with pytest.raises(InvalidRequest) as caught:
        tasks.upload("g", generate_bytes(gpt2))
    assert str(caught.value) == "4 prompt rows; this server allows at most 3"
    assert tasks.list() == []


def test_too_many_labels_is_refused(gpt2, engine_of):
    tasks = engine_of(max_labels=2).tasks
    data = artifact_bytes(random_prompt(gpt2, "[P:2]{input}[P:2]", task_type="classify", labels=LABELS))
    with pytest.raises(InvalidRequest) as caught:
        tasks.upload("c", data)
    assert str(caught.value) == "3 labels; this server allows at most 2"
    assert tasks.list() == []
    assert engine_of(max_labels=3).tasks.upload("c", data)["labels"] == LABELS


@pytest.mark.parametrize(
    ("generation", "reason"),
    [
        ({"temperature": -1}, "temperature must be 0 (greedy) or between 0.001 and 100, got -1"),
        ({"max_new_tokens": 2000}, "max_new_tokens 2000 exceeds this server's limit of 1024"),
        ({"stop": 3}, "stop must be a string or a list of strings, got 3"),
        # 4 pseudo tokens + 61 new ones do not fit the 64 positions of a slot
        (
            {"max_new_tokens": 61},
            "max_new_tokens 61 plus the template's own 4 tokens exceed the 64 positions a request may use here",
        ),  # fmt: skip
    ],
)
def test_bad_generation_defaults_are_refused(gpt2, engine_of, generation, reason):
    tasks = engine_of(max_seq_len=64, default_max_new_tokens=8).tasks
    with pytest.raises(InvalidRequest) as caught:
        tasks.upload("g", generate_bytes(gpt2, generation=generation))
    assert str(caught.value) == f"bad 'generation' defaults in the artifact: {reason}"
    assert tasks.list() == []


def test_generation_defaults_that_just_fit_are_stored(gpt2, engine_of):
    tasks = engine_of(max_seq_len=64, default_max_new_tokens=8).tasks
    assert tasks.upload("g", generate_bytes(gpt2, generation={"max_new_tokens": 60}))["version"] == 1


def test_peft_adapter_is_converted_for_the_served_model(gpt2, engine_of, tmp_path):
    make_adapter(gpt2.info["name_or_path"], "PROMPT_TUNING", tmp_path / "adapter", seed=3)
    config = (tmp_path / "adapter" / "adapter_config.json").read_bytes()
    weights = (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()
    tasks = engine_of().tasks
    summary = tasks.upload_peft("from-peft", config, weights)
    bos = default_bos_token(gpt2.tokenizer) or ""
    assert (summary["version"], summary["num_virtual_tokens"]) == (1, 5)
    assert summary["template"] == f"[P:5]{bos}{{input}}"
    stored = read_artifact(tasks.artifact("from-peft").data)
    (table,) = load_file(tmp_path / "adapter" / "adapter_model.safetensors").values()
    assert stored.embeddings.equal(table)


def test_peft_upload_with_a_bad_task_id_is_refused_before_converting(engine_of):
    with pytest.raises(InvalidTaskId) as caught:
        engine_of().tasks.upload_peft("no/slash", b"not json", b"not safetensors")
    assert str(caught.value) == (
        "invalid task id 'no/slash': use 1-128 characters of A-Z a-z 0-9 . _ - (and not '.' or '..')"
    )


def test_a_deleted_task_is_not_found_anywhere(gpt2, engine_of):
    engine = engine_of()
    engine.tasks.upload("g", generate_bytes(gpt2))
    assert engine.inference.prepare_generate("g", {"input": "hi"}, {}).prompt.version == 1  # now in the prompt cache
    engine.tasks.delete("g")
    missing = "no prompt is stored for task 'g'"
    for call in (engine.tasks.summary, engine.tasks.artifact, engine.tasks.delete):
        with pytest.raises(TaskNotFound) as caught:
            call("g")
        assert str(caught.value) == missing
    with pytest.raises(TaskNotFound) as caught:
        engine.inference.prepare_generate("g", {"input": "hi"}, {})
    assert str(caught.value) == missing
    assert engine.tasks.list() == [] and engine.prompts.stats()["size"] == 0
