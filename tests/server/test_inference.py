"""Inference, without HTTP: input limits, the position limit, sampling defaults,
the task-type check, and submitted work answered as the oracle answers it."""

import asyncio

import pytest

from prompt_store.artifact import artifact_bytes
from prompt_store.template import render
from ptcore.errors import InvalidRequest
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
    """Inference's streams, on an event loop as the routes use them: a generate
    request's records (streamed: pieces, then the rest with the result), a classify request's one record."""
    engine = engine_of()
    work = engine.inference.prepare_generate("g", {"input": "hello"}, {"max_new_tokens": 6})
    expected = alone_greedy(loaded.model, work.prompt.rows, work.input_ids, loaded.vocab_size, 6, loaded.eos_token_ids)

    async def ask():
        engine.start()
        plain = [o async for o in await engine.inference.generate("g", {"input": "hello"}, {"max_new_tokens": 6})]
        streamed = [o async for o in await engine.inference.generate("g", {"input": "hello"}, {"max_new_tokens": 6},
                                                                       stream=True)]  # fmt: skip
        label = [o async for o in await engine.inference.classify("c", {"input": "hello"})]
        return plain, streamed, label

    plain, streamed, label = asyncio.run(ask())
    assert [o.finished for o in plain] == [True] and plain[0].result.token_ids == expected
    assert (plain[0].result.version, plain[0].result.prompt_tokens) == (1, len(work.input_ids))
    assert [o.finished for o in streamed] == [False] * (len(streamed) - 1) + [True]
    assert "".join(o.text for o in streamed) == streamed[-1].result.text == plain[0].result.text
    assert [t for o in streamed for t in o.token_ids] == expected
    (label,) = label
    assert set(label.result.scores) == {"yes", "no"} and label.result.label == max(
        label.result.scores, key=label.result.scores.get
    )
    assert label.result.version == 1
    stats = engine.stats()
    assert (stats["engine"], stats["running"], stats["queue_depth"]) == ("continuous", 0, 0)
    assert engine.why_not_ready() is None
    assert engine.inference.router.listening() == 0  # every stream closed its queue
    engine.stop()
    assert engine.why_not_ready() == "the model worker is not running"


def recording_aborts(engine) -> list[int]:
    """The ids the engine's scheduler is asked to abort, from now on (it still aborts them)."""
    aborted, real_abort = [], engine.scheduler.abort
    engine.scheduler.abort = lambda request_id: (aborted.append(request_id), real_abort(request_id))
    return aborted


def test_a_stream_closed_early_aborts_its_request(loaded, engine_of):
    """A reader that stops before the last record (the client went away) aborts
    the request, and nothing is left listening. (That an aborted row leaves the
    batch before the next step: tests/server/test_scheduler.py.)"""
    engine = engine_of()
    aborted = recording_aborts(engine)

    async def leave_early():
        engine.start()
        records = await engine.inference.generate("g", {"input": "hello"}, {"max_new_tokens": 50}, stream=True)
        first = await anext(records)
        await records.aclose()
        return first

    first = asyncio.run(leave_early())
    assert not first.finished
    assert aborted == [first.request_id]
    assert engine.inference.router.listening() == 0
    engine.stop()


def test_a_task_tokenizes_its_template_text_once_not_per_request(loaded, engine_of, monkeypatch):
    import prompt_store.template

    engine = engine_of()
    engine.tasks.upload("lit", artifact_bytes(random_prompt(loaded, "[P:2] Review: {input} Sentiment:")))
    first = engine.inference.prepare_generate("lit", {"input": "hello"}, {})  # loads the task
    texts, real = [], prompt_store.template.tokenize_text

    def counting(tokenizer, text, split_special_tokens=False):
        texts.append(text)
        return real(tokenizer, text, split_special_tokens)

    monkeypatch.setattr(prompt_store.template, "tokenize_text", counting)
    second = engine.inference.prepare_generate("lit", {"input": "hello"}, {})
    assert texts == ["hello"]  # the request's field alone: the template's text was tokenized with the task
    assert second.input_ids == first.input_ids == render(second.prompt.template, loaded.tokenizer, {"input": "hello"},
                                                          loaded.vocab_size)  # fmt: skip


def test_a_stream_dropped_before_its_first_read_still_aborts_its_request(loaded, engine_of):
    """A response cancelled before it began to read (its client left at once)
    never runs the stream's `finally`: collecting the stream aborts the request."""
    import gc

    engine = engine_of()
    aborted = recording_aborts(engine)

    async def drop_unread():
        engine.start()
        records = await engine.inference.generate("g", {"input": "hello"}, {"max_new_tokens": 50}, stream=True)
        listening = engine.inference.router.listening()
        del records
        gc.collect()
        return listening

    assert asyncio.run(drop_unread()) == 1
    assert len(aborted) == 1
    assert engine.inference.router.listening() == 0
    engine.stop()


def test_a_stream_read_to_its_end_is_not_aborted_when_collected(loaded, engine_of):
    import gc

    engine = engine_of()
    aborted = recording_aborts(engine)

    async def read_all():
        engine.start()
        records = await engine.inference.generate("g", {"input": "hello"}, {"max_new_tokens": 3})
        outs = [o async for o in records]
        del records
        gc.collect()
        return outs

    assert asyncio.run(read_all())[-1].finished
    assert aborted == []
    engine.stop()
