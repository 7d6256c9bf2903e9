"""Batched paths must reproduce each request computed alone, on an
absolute-position model (GPT-2) and a rotary one (Llama), through both backends
of the one scheduler (the slot KV cache and Hugging Face's forward).

The oracle is the greedy continuation of one request computed alone, with no
cache, from inputs_embeds = render(template, h, x); a label's score is the
summed log-probability of its verbalizer tokens following the rendered
sequence. Greedy tokens must be the oracle's exactly, except from a near tie on
(greedy_mismatch); label scores and probabilities agree to FLOAT_RTOL of their
scale (float_mismatch): the rule in tests/helpers.py's oracle section. The
mutation checks at the end show both comparisons fail a wrong answer."""

import pytest
import torch

import ptcore.scoring
import server.engine.hf_backend
from prompt_store.template import render
from ptcore.task_prompt import task_prompt
from server.engine.classify import Classifier
from server.engine.models.cpu_linear import MKL_ROWS
from server.engine.outputs import Collected
from server.engine.request import Request, SamplingParams
from tests.helpers import (
    LABEL_SETS,
    TEMPLATES,
    TIE_RTOL,
    alone_greedy,
    alone_label_logprobs,
    alone_label_scores,
    drive,
    float_mismatch,
    greedy_mismatch,
    make_classify,
    make_scheduler,
    random_prompt,
    submit_from_threads,
    visible_padding,
)


def make_generate(loaded, i, template, fields, max_new_tokens=12, **params):
    prompt = task_prompt(f"task{i}", 1, random_prompt(loaded, template, seed=i), loaded)
    ids = render(prompt.template, loaded.tokenizer, fields, loaded.vocab_size)
    return Request.generate(prompt, ids, SamplingParams(max_new_tokens=max_new_tokens, **params))


def oracle(loaded, work, margins=None):
    return alone_greedy(
        loaded.model, work.prompt.rows, work.input_ids, loaded.vocab_size, work.params.max_new_tokens,
        loaded.eos_token_ids, margins,
    )  # fmt: skip


def assert_oracle_tokens(loaded, work, token_ids):
    """The oracle's greedy tokens, exactly, up to a near tie (rule 3 in tests/helpers.py)."""
    mismatch = greedy_mismatch(loaded, work, token_ids)
    assert mismatch is None, mismatch


def classification_mismatch(loaded, work, result) -> str | None:
    """None when a classify result has the oracle's label scores (log-probs) and
    probabilities, to FLOAT_RTOL of their scale; else what differs."""
    args = (loaded.model, work.prompt.rows, work.input_ids, loaded.vocab_size, work.prompt.label_ids)
    if list(result.scores) != list(work.prompt.labels) or list(result.logprobs) != list(work.prompt.labels):
        return f"labels {list(result.scores)}, want {list(work.prompt.labels)}"
    # probabilities can saturate at 0/1; the raw scores show any difference
    for what, got, want in (("log-probs", result.logprobs, alone_label_logprobs(*args)),
                            ("probabilities", result.scores, alone_label_scores(*args))):  # fmt: skip
        mismatch = float_mismatch(list(got.values()), want)
        if mismatch is not None:
            return f"{what}: {mismatch}"
    return None


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
        assert_oracle_tokens(loaded, w, r.token_ids)
        # with no stop strings, a row stops early only at an end-of-sequence token
        assert r.finish_reason == ("stop" if len(r.token_ids) < w.params.max_new_tokens else "length")
        assert r.text == loaded.tokenizer.decode(r.token_ids, skip_special_tokens=True)


def test_decode_steps_of_mkl_rows_rows_equal_alone(loaded):
    """At MKL_ROWS running rows every product of a CPU decode step reads MKL's
    packed weights (server/engine/models/cpu_linear.py), a path no smaller batch takes."""
    works = [make_generate(loaded, i, *TEMPLATES[i % len(TEMPLATES)], max_new_tokens=4 + i % 3)
             for i in range(MKL_ROWS)]  # fmt: skip
    scheduler = make_scheduler(loaded, max_running=MKL_ROWS)
    results, _ = drive(scheduler, works)
    assert any(b["kind"] == "decode" and b["size"] == MKL_ROWS for b in scheduler.stats.snapshot()["recent"])
    for w, r in zip(works, results):
        assert_oracle_tokens(loaded, w, r.token_ids)


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
        assert_oracle_tokens(loaded, w, r.token_ids)


def classify_works(loaded):
    return [make_classify(loaded, i, LABEL_SETS[i % 3], *TEMPLATES[i % len(TEMPLATES)]) for i in range(6)]


def test_batched_classification_equals_alone(loaded):
    works = classify_works(loaded)
    assert any(len(v) > 1 for w in works for v in w.prompt.label_ids)  # multi-token verbalizers
    for w, r in zip(works, Classifier(loaded).run(works)):
        mismatch = classification_mismatch(loaded, w, r)
        assert mismatch is None, mismatch
        assert r.label == max(r.scores, key=r.scores.get)


def test_scheduler_batches_concurrent_submissions_and_keeps_results_apart(loaded, engine):
    scheduler = make_scheduler(loaded, engine, max_batch_size=8, max_wait_s=0.2, max_running=8)
    collected = Collected()
    scheduler.start(collected)
    works = [make_generate(loaded, i % 5, *TEMPLATES[i % 5], max_new_tokens=6 + i % 4) for i in range(12)]
    works += [make_classify(loaded, i, LABEL_SETS[i % 3], *TEMPLATES[i % 5]) for i in range(4)]
    results = submit_from_threads(scheduler, works, collected)
    scheduler.stop()
    for w, r in zip(works, results):
        if w.kind == "generate":
            assert_oracle_tokens(loaded, w, r.token_ids)
        else:
            mismatch = classification_mismatch(loaded, w, r)
            assert mismatch is None, mismatch
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
    assert_oracle_tokens(loaded, greedy, mixed[0].token_ids)
    (other,) = generate(loaded, engine, [sampled(124)])
    assert other.token_ids != alone.token_ids
    (continuous,) = generate(loaded, "continuous", [sampled(123)])
    assert continuous.token_ids == alone.token_ids


def test_top_k_one_is_greedy(loaded, engine):
    w = make_generate(loaded, 2, *TEMPLATES[2], temperature=0.7, top_k=1, seed=5)
    assert_oracle_tokens(loaded, w, generate(loaded, engine, [w])[0].token_ids)


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
    assert_oracle_tokens(loaded, other, unaffected.token_ids)


def test_serving_leaves_the_weights_untouched(loaded, engine):
    before = {name: p.clone() for name, p in loaded.model.named_parameters()}
    generate(loaded, engine, [make_generate(loaded, i, t, f) for i, (t, f) in enumerate(TEMPLATES)])
    Classifier(loaded).run([make_classify(loaded, 0, LABEL_SETS[0], *TEMPLATES[0])])
    assert all(not p.requires_grad for p in loaded.model.parameters())
    # exact: a clone against the tensor it was copied from, nothing computed
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
    assert_oracle_tokens(loaded, good, results[0].token_ids)
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
    streamed.stream = True  # a live stream: its text is kept as tokens arrive
    plain = [make_generate(loaded, i, *TEMPLATES[i]) for i in (1, 2)]
    results, _ = drive(make_scheduler(loaded, engine, max_running=8), [streamed, *plain])
    assert_oracle_tokens(loaded, streamed, results[0].token_ids)
    assert [(type(r), str(r)) for r in results[1:]] == [(RuntimeError, "decoding blew up")] * 2


# --- mutation checks: the comparisons above fail wrong answers ----------------


def test_the_classification_tolerance_fails_a_batch_with_a_visible_padding_position(loaded, monkeypatch):
    """The batch of test_batched_classification_equals_alone, scored with the
    padding position next to each padded row's tokens left visible: every
    request with a padded row (causal LMs run one row per label) fails
    classification_mismatch."""
    works = classify_works(loaded)
    lengths = [[len(w.input_ids) + len(v) for v in w.prompt.label_ids] for w in works]
    T = max(max(n) for n in lengths)
    padded = [min(n) < T for n in lengths]
    assert sum(padded) >= 4
    monkeypatch.setattr(ptcore.scoring, "pack", visible_padding(ptcore.scoring.pack))
    results = Classifier(loaded).run(works)
    monkeypatch.undo()
    for w, r, was_padded in zip(works, results, padded):
        mismatch = classification_mismatch(loaded, w, r)
        assert (mismatch is not None) == was_padded, mismatch


def test_greedy_mismatch_fails_a_wrong_token_at_a_decided_step(loaded):
    w = make_generate(loaded, 0, *TEMPLATES[0], max_new_tokens=8)
    margins: list[float] = []
    want = oracle(loaded, w, margins)
    assert len(want) == 8 and min(margins) >= TIE_RTOL  # every step decided
    assert greedy_mismatch(loaded, w, want) is None
    wrong = want[:3] + [(want[3] + 1) % loaded.vocab_size] + want[4:]
    assert "step 3" in greedy_mismatch(loaded, w, wrong)
    assert "step 7" in greedy_mismatch(loaded, w, want[:7])  # stopped a token early


def test_greedy_mismatch_fails_a_static_batch_with_a_visible_padding_position(loaded, monkeypatch):
    """The Hugging Face backend left-pads its batch: with the padding position
    next to each shorter row's tokens left visible, shorter rows' tokens part
    from the oracle's at a decided step (two or more of the four: a leaked key
    does not always move the argmax), and the longest row's do not."""
    works = [make_generate(loaded, i, t, f, max_new_tokens=10) for i, (t, f) in enumerate(TEMPLATES)]
    monkeypatch.setattr(server.engine.hf_backend, "pack", visible_padding(server.engine.hf_backend.pack))
    results = generate(loaded, "static", works)
    monkeypatch.undo()
    longest = max(len(w.input_ids) for w in works)
    mismatches = [greedy_mismatch(loaded, w, r.token_ids) for w, r in zip(works, results)]
    assert all(m is None for w, m in zip(works, mismatches) if len(w.input_ids) == longest)
    assert sum(m is not None for m in mismatches) >= 2, mismatches
