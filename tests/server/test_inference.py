"""Inference, without HTTP: input limits, the position limit, sampling defaults,
the task-type check, and submitted work answered as the oracle answers it."""

import pytest

from prompt_store.artifact import artifact_bytes
from prompt_store.errors import InvalidRequest
from prompt_store.template import render
from server.build import build_engine
from server.engine.request import SamplingParams
from server.inference import CHARS_PER_TOKEN_BOUND
from server.settings import Settings
from tests.helpers import alone_greedy, random_prompt

TEMPLATE = "[P:2]{input}[P:2]"


@pytest.fixture
def engine_of(loaded, tmp_path):
    built = []

    def build(generation=None, **settings):
        """An engine on `loaded` holding generate task 'g' (with these `generation`
        defaults) and classify task 'c'; its scheduler is not started."""
        settings = Settings(model=loaded.info["name_or_path"], store=str(tmp_path / f"store{len(built)}"), **settings)
        engine = build_engine(settings, loaded)
        built.append(engine)
        meta = {} if generation is None else {"generation": generation}
        engine.tasks.upload("g", artifact_bytes(random_prompt(loaded, TEMPLATE, **meta)))
        labels = {"yes": " yes", "no": " no"}
        engine.tasks.upload("c", artifact_bytes(random_prompt(loaded, TEMPLATE, task_type="classify", labels=labels)))
        return engine

    yield build
    for engine in built:
        engine.stop()


def refusal(prepare, *args) -> str:
    with pytest.raises(InvalidRequest) as caught:
        prepare(*args)
    return str(caught.value)


def test_input_over_the_character_bound_is_refused_before_tokenizing(engine_of):
    inference = engine_of(max_input_tokens=40).inference
    cap = 40 * CHARS_PER_TOKEN_BOUND
    assert refusal(inference.prepare_generate, "g", {"input": "x" * (cap + 1)}, {}) == (
        f"input is {cap + 1} characters; the limit is {cap} ({CHARS_PER_TOKEN_BOUND} characters per token of "
        "the 40-token input limit), checked before tokenizing"
    )
    fields = {"premise": "x" * cap, "hypothesis": "y"}  # every field counts
    assert refusal(inference.prepare_classify, "c", fields).startswith(f"input is {cap + 1} characters; ")


def test_rendered_input_over_the_token_limit_is_refused(loaded, engine_of):
    inference = engine_of(max_input_tokens=40).inference
    fields = {"input": "hello world " * 30}  # 360 characters: under the bound, over 40 tokens
    n = len(render(inference.prompts.get("g").template, loaded.tokenizer, fields, loaded.vocab_size))
    assert n > 40
    assert refusal(inference.prepare_generate, "g", fields, {}) == f"rendered input is {n} tokens; the limit is 40"
    assert refusal(inference.prepare_classify, "c", fields) == f"rendered input is {n} tokens; the limit is 40"


def test_input_plus_new_tokens_must_fit_the_slot(engine_of):
    inference = engine_of(max_seq_len=64, default_max_new_tokens=8).inference
    assert inference.position_limit == 64  # the slot backend's slot length
    n = len(inference.prepare_generate("g", {"input": "hi"}, {"max_new_tokens": 1}).input_ids)
    assert inference.prepare_generate("g", {"input": "hi"}, {"max_new_tokens": 64 - n}).params.max_new_tokens == 64 - n
    assert refusal(inference.prepare_generate, "g", {"input": "hi"}, {"max_new_tokens": 65 - n}) == (
        f"{n} input tokens + max_new_tokens {65 - n} exceed the 64 positions a request may use here"
    )


def test_the_static_engine_bounds_positions_by_the_model(loaded, engine_of):
    inference = engine_of(engine="static", max_seq_len=64).inference
    assert inference.position_limit == loaded.max_positions == 512  # max_seq_len is the continuous engine's
    n = len(inference.prepare_generate("g", {"input": "hi"}, {"max_new_tokens": 1}).input_ids)
    assert refusal(inference.prepare_generate, "g", {"input": "hi"}, {"max_new_tokens": 600}) == (
        f"{n} input tokens + max_new_tokens 600 exceed the 512 positions a request may use here"
    )


def test_request_values_win_over_the_artifact_which_wins_over_the_server(engine_of):
    generation = {"max_new_tokens": 7, "temperature": 0.5, "top_k": 3, "stop": "\n"}
    inference = engine_of(generation, default_max_new_tokens=5).inference
    prepare = lambda overrides: inference.prepare_generate("g", {"input": "hi"}, overrides).params  # noqa: E731
    assert prepare({}) == SamplingParams(max_new_tokens=7, temperature=0.5, top_k=3, stop=("\n",))
    unset = {"max_new_tokens": None, "temperature": None, "top_p": None, "top_k": None, "stop": None, "seed": None}
    assert prepare(unset) == prepare({})  # None is unset, not a value
    assert prepare({"max_new_tokens": 2, "temperature": 0, "stop": ["a", "b"], "seed": 9}) == SamplingParams(
        max_new_tokens=2, temperature=0, top_k=3, stop=("a", "b"), seed=9
    )
    assert prepare({"not_a_sampling_key": 1}) == prepare({})


def test_without_artifact_defaults_the_server_default_applies(engine_of):
    inference = engine_of(default_max_new_tokens=5).inference
    assert inference.prepare_generate("g", {"input": "hi"}, {}).params == SamplingParams(max_new_tokens=5)


def test_sampling_values_are_checked(engine_of):
    inference = engine_of(max_new_tokens_limit=100).inference
    assert refusal(inference.prepare_generate, "g", {"input": "hi"}, {"max_new_tokens": 101}) == (
        "max_new_tokens 101 exceeds this server's limit of 100"
    )
    assert refusal(inference.prepare_generate, "g", {"input": "hi"}, {"top_p": 0}) == "top_p must be in (0, 1], got 0"


def test_each_task_type_has_its_own_route(engine_of):
    inference = engine_of().inference
    assert refusal(inference.prepare_classify, "g", {"input": "hi"}) == (
        "task 'g' is a generate task; use its /generate route"
    )
    assert refusal(inference.prepare_generate, "c", {"input": "hi"}, {}) == (
        "task 'c' is a classify task; use its /classify route"
    )


def test_submitted_work_is_answered_as_the_oracle_answers(loaded, engine_of):
    engine = engine_of()
    engine.start()
    work = engine.inference.prepare_generate("g", {"input": "hello"}, {"max_new_tokens": 6})
    result = engine.inference.submit(work).result(timeout=60)
    expected = alone_greedy(loaded.model, work.prompt.rows, work.input_ids, loaded.vocab_size, 6, loaded.eos_token_ids)
    assert result.token_ids == expected
    label = engine.inference.submit(engine.inference.prepare_classify("c", {"input": "hello"})).result(timeout=60)
    assert set(label.scores) == {"yes", "no"} and label.label == max(label.scores, key=label.scores.get)
    stats = engine.stats()
    assert (stats["engine"], stats["running"], stats["queue_depth"]) == ("continuous", 0, 0)
    assert engine.why_not_ready() is None
    engine.stop()
    assert engine.why_not_ready() == "the model worker is not running"
