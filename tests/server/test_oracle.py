"""Batched paths must reproduce each request computed alone (DESIGN.md oracle),
on an absolute-position model (GPT-2) and a rotary one (Llama)."""

import torch

from prompt_store.template import render
from ptcore.task_prompt import task_prompt
from server.engine.request import ClassifyWork, GenerateWork, SamplingParams
from server.engine.runner import ModelRunner
from server.engine.scheduler import BatchStats, Scheduler
from tests.helpers import alone_greedy, alone_label_logprobs, alone_label_scores, random_prompt, submit_from_threads

# pseudo tokens before, between and after fields; different prompt lengths
TEMPLATES = [
    ("[P:3]{input}[P:3]", {"input": "hello world"}),
    ("[P:2] Review: {input} [P:2] Sentiment:", {"input": "the quick brown fox jumps over the lazy dog"}),
    ("{premise}[P:3]{hypothesis}?[P:3]", {"premise": "a cat sat", "hypothesis": "is it a dog"}),
    ("[P:9]{input}", {"input": "x"}),
    ("Question: {input}[P:1]", {"input": "what is the return value of this function"}),
]


def make_generate(loaded, i, template, fields, max_new_tokens=12, **params):
    prompt = task_prompt(f"task{i}", 1, random_prompt(loaded, template, seed=i), loaded)
    ids = render(prompt.template, loaded.tokenizer, fields, loaded.vocab_size)
    return GenerateWork(prompt, ids, SamplingParams(max_new_tokens=max_new_tokens, **params))


def oracle(loaded, runner, work):
    return alone_greedy(
        loaded.model, work.prompt.rows, work.input_ids, loaded.vocab_size, work.params.max_new_tokens, runner.eos_ids
    )


def test_batched_greedy_equals_alone(loaded):
    runner = ModelRunner(loaded)
    works = [make_generate(loaded, i, t, f, max_new_tokens=10 + i) for i, (t, f) in enumerate(TEMPLATES)]
    results = runner.generate(works)
    for w, r in zip(works, results):
        assert r.token_ids == oracle(loaded, runner, w)
        assert r.finish_reason in ("stop", "length")
        assert r.text == loaded.tokenizer.decode(r.token_ids, skip_special_tokens=True)


def test_the_prompt_changes_the_output(loaded):
    """Guards the test model: if outputs ignored the prompt, the oracle test would prove little."""
    runner = ModelRunner(loaded)
    a = make_generate(loaded, 0, "[P:3]{input}[P:3]", {"input": "hello world"})
    b = make_generate(loaded, 1, "[P:3]{input}[P:3]", {"input": "hello world"})
    ra, rb = runner.generate([a, b])
    assert ra.token_ids != rb.token_ids


def test_same_task_with_many_inputs_in_one_batch(loaded):
    runner = ModelRunner(loaded)
    template = "[P:4]{input}[P:2]"
    prompt = task_prompt("one", 1, random_prompt(loaded, template, seed=7), loaded)
    texts = ["a", "a b c d e f g", "json is a format", "", "logging"]
    works = [
        GenerateWork(
            prompt, render(prompt.template, loaded.tokenizer, {"input": t}, loaded.vocab_size), SamplingParams(8)
        )
        for t in texts
    ]
    for w, r in zip(works, runner.generate(works)):
        assert r.token_ids == oracle(loaded, runner, w)


LABEL_SETS = [
    {"positive": " good", "negative": " bad thing"},
    {"yes": "yes", "no": "no", "maybe": " maybe so"},
    {"a": " the return value of", "b": " b"},
]


def make_classify(loaded, i, labels, template, fields):
    artifact = random_prompt(loaded, template, "classify", labels, seed=100 + i)
    prompt = task_prompt(f"cls{i}", 1, artifact, loaded)
    return ClassifyWork(prompt, render(prompt.template, loaded.tokenizer, fields, loaded.vocab_size))


def test_batched_classification_equals_alone(loaded):
    runner = ModelRunner(loaded)
    works = [make_classify(loaded, i, LABEL_SETS[i % 3], *TEMPLATES[i % len(TEMPLATES)]) for i in range(6)]
    assert any(len(v) > 1 for w in works for v in w.prompt.label_ids)  # multi-token verbalizers
    for w, r in zip(works, runner.classify(works)):
        args = (loaded.model, w.prompt.rows, w.input_ids, loaded.vocab_size, w.prompt.label_ids)
        assert list(r.scores) == list(w.prompt.labels)
        for got, want in zip(r.scores.values(), alone_label_scores(*args)):
            assert abs(got - want) < 1e-5
        # probabilities can saturate at 0/1; the raw scores show any difference
        for got, want in zip(r.logprobs.values(), alone_label_logprobs(*args)):
            assert abs(got - want) < 1e-4 * max(1.0, abs(want))
        assert r.label == max(r.scores, key=r.scores.get)


def test_scheduler_batches_concurrent_submissions_and_keeps_results_apart(loaded):
    runner = ModelRunner(loaded)
    stats = BatchStats()
    scheduler = Scheduler(runner, max_batch_size=8, max_wait_s=0.2, stats=stats)
    scheduler.start()
    works = [make_generate(loaded, i % 5, *TEMPLATES[i % 5], max_new_tokens=6 + i % 4) for i in range(12)]
    works += [make_classify(loaded, i, LABEL_SETS[i % 3], *TEMPLATES[i % 5]) for i in range(4)]
    results = submit_from_threads(scheduler, works)
    scheduler.stop()
    for w, r in zip(works, results):
        if isinstance(w, GenerateWork):
            assert r.token_ids == oracle(loaded, runner, w)
        else:
            expected = alone_label_scores(
                loaded.model, w.prompt.rows, w.input_ids, loaded.vocab_size, w.prompt.label_ids
            )
            assert max(abs(a - b) for a, b in zip(r.scores.values(), expected)) < 1e-5
    snap = stats.snapshot()
    assert snap["requests"] == len(works)
    assert snap["max_batch_size_seen"] > 1 and snap["max_batch_size_seen"] <= 8


def test_sampling_is_seeded_per_request_and_honours_its_own_parameters(loaded):
    runner = ModelRunner(loaded)
    t, f = TEMPLATES[0]
    sampled = make_generate(loaded, 0, t, f, max_new_tokens=10, temperature=1.5, top_k=50, top_p=0.9, seed=123)
    greedy = make_generate(loaded, 0, t, f, max_new_tokens=10)
    # the same seeded request gives the same tokens, alone or beside a greedy one
    (alone,) = runner.generate([sampled])
    mixed = runner.generate([greedy, sampled, make_generate(loaded, 1, *TEMPLATES[1])])
    assert mixed[1].token_ids == alone.token_ids
    assert mixed[0].token_ids == oracle(loaded, runner, greedy)
    other_seed = make_generate(loaded, 0, t, f, max_new_tokens=10, temperature=1.5, top_k=50, top_p=0.9, seed=124)
    draws = {tuple(runner.generate([other_seed])[0].token_ids), tuple(alone.token_ids)}
    assert len(draws) == 2


def test_top_k_one_is_greedy(loaded):
    runner = ModelRunner(loaded)
    w = make_generate(loaded, 2, *TEMPLATES[2], temperature=0.7, top_k=1, seed=5)
    assert runner.generate([w])[0].token_ids == oracle(loaded, runner, w)


def test_stop_strings_end_a_row_and_are_cut_from_the_text(loaded):
    runner = ModelRunner(loaded)
    t, f = TEMPLATES[1]
    full = runner.generate([make_generate(loaded, 3, t, f, max_new_tokens=12)])[0]
    stop = full.text[3:5]
    assert stop.strip()  # a visible stop string somewhere inside the greedy text
    w = make_generate(loaded, 3, t, f, max_new_tokens=12, stop=(stop,))
    other = make_generate(loaded, 4, *TEMPLATES[0], max_new_tokens=12)
    stopped, unaffected = runner.generate([w, other])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.find(stop)]
    assert stop not in stopped.text
    assert unaffected.token_ids == oracle(loaded, runner, other)


def test_serving_leaves_the_weights_untouched(loaded):
    before = {name: p.clone() for name, p in loaded.model.named_parameters()}
    runner = ModelRunner(loaded)
    runner.generate([make_generate(loaded, i, t, f) for i, (t, f) in enumerate(TEMPLATES)])
    runner.classify([make_classify(loaded, 0, LABEL_SETS[0], *TEMPLATES[0])])
    assert all(not p.requires_grad for p in loaded.model.parameters())
    assert all(torch.equal(before[name], p) for name, p in loaded.model.named_parameters())


def test_a_row_whose_sampling_fails_does_not_sink_its_batch(loaded, monkeypatch):
    from server.engine.sampling import RowDecoder

    real_sample = RowDecoder.sample

    def sample(self, logits):
        if self.params.seed == 666:
            raise RuntimeError("sampling blew up")
        return real_sample(self, logits)

    monkeypatch.setattr(RowDecoder, "sample", sample)
    runner = ModelRunner(loaded)
    good = make_generate(loaded, 0, *TEMPLATES[0])
    bad = make_generate(loaded, 1, *TEMPLATES[1], temperature=1.0, seed=666)
    finished = []
    results = runner.generate([good, bad], on_finish=lambda i, r: finished.append(i))
    assert isinstance(results[1], RuntimeError)
    assert results[0].token_ids == oracle(loaded, runner, good)
    assert finished[0] == 1  # the failed row is reported at once


def test_classification_is_split_into_bounded_forward_passes(loaded):
    works = [make_classify(loaded, i, LABEL_SETS[i % 3], *TEMPLATES[i % len(TEMPLATES)]) for i in range(5)]
    whole = ModelRunner(loaded).classify(works)
    small = ModelRunner(loaded, max_classify_rows=3)
    assert [len(c) for c in small._classify_chunks(works)] == [1, 1, 1, 1, 1]
    for a, b in zip(whole, small.classify(works)):
        assert a.label == b.label
        assert max(abs(x - y) for x, y in zip(a.logprobs.values(), b.logprobs.values())) < 1e-4
