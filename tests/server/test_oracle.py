"""Batched paths must reproduce each request computed alone (DESIGN.md oracle),
on an absolute-position model (GPT-2) and a rotary one (Llama), through both
backends of the one scheduler (the slot KV cache and Hugging Face's forward)."""

import pytest
import torch

from prompt_store.template import render
from ptcore.task_prompt import task_prompt
from server.engine.classify import Classifier
from server.engine.request import Request, SamplingParams
from tests.helpers import (
    LABEL_SETS,
    TEMPLATES,
    alone_greedy,
    alone_label_logprobs,
    alone_label_scores,
    drive,
    make_classify,
    make_scheduler,
    random_prompt,
    submit_from_threads,
)


def make_generate(loaded, i, template, fields, max_new_tokens=12, **params):
    prompt = task_prompt(f"task{i}", 1, random_prompt(loaded, template, seed=i), loaded)
    ids = render(prompt.template, loaded.tokenizer, fields, loaded.vocab_size)
    return Request.generate(prompt, ids, SamplingParams(max_new_tokens=max_new_tokens, **params))


def oracle(loaded, work):
    return alone_greedy(
        loaded.model, work.prompt.rows, work.input_ids, loaded.vocab_size, work.params.max_new_tokens,
        loaded.eos_token_ids,
    )  # fmt: skip


@pytest.fixture(params=["continuous", "static"])
def engine(request):
    return request.param


def generate(loaded, engine, works, **options):
    """Every request admitted at once (when the backend has room), answered by the real scheduler loop."""
    results, _ = drive(make_scheduler(loaded, engine, **{"max_running": 8, **options}), works)
    return results


def test_batched_greedy_equals_alone(loaded, engine):
    works = [make_generate(loaded, i, t, f, max_new_tokens=10 + i) for i, (t, f) in enumerate(TEMPLATES)]
    results = generate(loaded, engine, works)
    for w, r in zip(works, results):
        expected = oracle(loaded, w)
        assert r.token_ids == expected
        # the oracle stops early only at an end-of-sequence token
        assert r.finish_reason == ("stop" if len(expected) < w.params.max_new_tokens else "length")
        assert r.text == loaded.tokenizer.decode(r.token_ids, skip_special_tokens=True)


def test_the_prompt_changes_the_output(loaded):
    """Guards the test model: if outputs ignored the prompt, the oracle test would prove little."""
    a = make_generate(loaded, 0, "[P:3]{input}[P:3]", {"input": "hello world"})
    b = make_generate(loaded, 1, "[P:3]{input}[P:3]", {"input": "hello world"})
    ra, rb = generate(loaded, "continuous", [a, b])
    assert ra.token_ids != rb.token_ids


def test_same_task_with_many_inputs_in_one_batch(loaded, engine):
    template = "[P:4]{input}[P:2]"
    prompt = task_prompt("one", 1, random_prompt(loaded, template, seed=7), loaded)
    texts = ["a", "a b c d e f g", "json is a format", "", "logging"]
    works = [
        Request.generate(
            prompt, render(prompt.template, loaded.tokenizer, {"input": t}, loaded.vocab_size), SamplingParams(8)
        )
        for t in texts
    ]
    for w, r in zip(works, generate(loaded, engine, works)):
        assert r.token_ids == oracle(loaded, w)


def test_batched_classification_equals_alone(loaded):
    works = [make_classify(loaded, i, LABEL_SETS[i % 3], *TEMPLATES[i % len(TEMPLATES)]) for i in range(6)]
    assert any(len(v) > 1 for w in works for v in w.prompt.label_ids)  # multi-token verbalizers
    for w, r in zip(works, Classifier(loaded).run(works)):
        args = (loaded.model, w.prompt.rows, w.input_ids, loaded.vocab_size, w.prompt.label_ids)
        assert list(r.scores) == list(w.prompt.labels)
        for got, want in zip(r.scores.values(), alone_label_scores(*args)):
            assert abs(got - want) < 1e-5
        # probabilities can saturate at 0/1; the raw scores show any difference
        for got, want in zip(r.logprobs.values(), alone_label_logprobs(*args)):
            assert abs(got - want) < 1e-4 * max(1.0, abs(want))
        assert r.label == max(r.scores, key=r.scores.get)


def test_scheduler_batches_concurrent_submissions_and_keeps_results_apart(loaded, engine):
    scheduler = make_scheduler(loaded, engine, max_batch_size=8, max_wait_s=0.2, max_running=8)
    scheduler.start()
    works = [make_generate(loaded, i % 5, *TEMPLATES[i % 5], max_new_tokens=6 + i % 4) for i in range(12)]
    works += [make_classify(loaded, i, LABEL_SETS[i % 3], *TEMPLATES[i % 5]) for i in range(4)]
    results = submit_from_threads(scheduler, works)
    scheduler.stop()
    for w, r in zip(works, results):
        if w.kind == "generate":
            assert r.token_ids == oracle(loaded, w)
        else:
            expected = alone_label_scores(
                loaded.model, w.prompt.rows, w.input_ids, loaded.vocab_size, w.prompt.label_ids
            )
            assert max(abs(a - b) for a, b in zip(r.scores.values(), expected)) < 1e-5
    snap = scheduler.stats.snapshot()
    assert snap["requests"] == len(works)
    assert 1 < snap["max_batch_size_seen"] <= 8


def test_sampling_is_seeded_per_request_and_honours_its_own_parameters(loaded, engine):
    t, f = TEMPLATES[0]

    def sampled(seed):
        return make_generate(loaded, 0, t, f, max_new_tokens=10, temperature=1.5, top_k=50, top_p=0.9, seed=seed)

    # the same seeded request gives the same tokens, alone or beside others, on both backends
    (alone,) = generate(loaded, engine, [sampled(123)])
    greedy = make_generate(loaded, 0, t, f, max_new_tokens=10)
    mixed = generate(loaded, engine, [greedy, sampled(123), make_generate(loaded, 1, *TEMPLATES[1])])
    assert mixed[1].token_ids == alone.token_ids
    assert mixed[0].token_ids == oracle(loaded, greedy)
    (other,) = generate(loaded, engine, [sampled(124)])
    assert other.token_ids != alone.token_ids
    (continuous,) = generate(loaded, "continuous", [sampled(123)])
    assert continuous.token_ids == alone.token_ids


def test_top_k_one_is_greedy(loaded, engine):
    w = make_generate(loaded, 2, *TEMPLATES[2], temperature=0.7, top_k=1, seed=5)
    assert generate(loaded, engine, [w])[0].token_ids == oracle(loaded, w)


def test_stop_strings_end_a_row_and_are_cut_from_the_text(loaded, engine):
    t, f = TEMPLATES[1]
    full = generate(loaded, engine, [make_generate(loaded, 3, t, f, max_new_tokens=12)])[0]
    stop = full.text[3:5]
    assert stop.strip()  # a visible stop string somewhere inside the greedy text
    w = make_generate(loaded, 3, t, f, max_new_tokens=12, stop=(stop,))
    other = make_generate(loaded, 4, *TEMPLATES[0], max_new_tokens=12)
    stopped, unaffected = generate(loaded, engine, [w, other])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.find(stop)]
    assert stop not in stopped.text
    assert unaffected.token_ids == oracle(loaded, other)


def test_serving_leaves_the_weights_untouched(loaded, engine):
    before = {name: p.clone() for name, p in loaded.model.named_parameters()}
    generate(loaded, engine, [make_generate(loaded, i, t, f) for i, (t, f) in enumerate(TEMPLATES)])
    Classifier(loaded).run([make_classify(loaded, 0, LABEL_SETS[0], *TEMPLATES[0])])
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert all(torch.equal(before[name], p) for name, p in loaded.model.named_parameters())


def test_a_row_whose_detokenization_fails_does_not_sink_its_batch(loaded, engine, monkeypatch):
    from server.engine.text import TextStream

    real_push = TextStream.push

    def push(self, token_id):
        if self.stop == ("boom",):
            raise RuntimeError("detokenization blew up")
        return real_push(self, token_id)

    monkeypatch.setattr(TextStream, "push", push)
    good = make_generate(loaded, 0, *TEMPLATES[0])
    bad = make_generate(loaded, 1, *TEMPLATES[1], stop=("boom",))
    scheduler = make_scheduler(loaded, engine, max_running=8)
    results, log = drive(scheduler, [good, bad])
    assert isinstance(results[1], RuntimeError) and str(results[1]) == "detokenization blew up"
    assert results[0].token_ids == oracle(loaded, good)
    assert log[:3] == [(0, "join", 0), (0, "join", 1), (0, "leave", 1)]  # the failed row leaves at once


def test_a_row_whose_text_fails_to_decode_at_the_end_is_answered_with_the_error(loaded, engine, monkeypatch):
    """A row that is not streamed and has no stop strings decodes its text once,
    when it is answered: if that raises, it gets the error, and its batch-mates
    their answers."""
    from server.engine.text import TextStream

    real_text = TextStream.text

    def text(self):
        if not self.live:
            raise RuntimeError("decoding blew up")
        return real_text.fget(self)

    monkeypatch.setattr(TextStream, "text", property(text))
    streamed = make_generate(loaded, 0, *TEMPLATES[0])
    streamed.on_text = lambda piece: None  # a live stream: its text is kept as tokens arrive
    plain = [make_generate(loaded, i, *TEMPLATES[i]) for i in (1, 2)]
    results, _ = drive(make_scheduler(loaded, engine, max_running=8), [streamed, *plain])
    assert results[0].token_ids == oracle(loaded, streamed)
    assert [(type(r), str(r)) for r in results[1:]] == [(RuntimeError, "decoding blew up")] * 2
