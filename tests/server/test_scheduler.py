"""The one scheduler loop, driven by a scripted backend (no model): admission,
prefill, decode steps, retirement, classify batches, abandonment, failures,
streaming and shutdown, each checked exactly."""

import threading
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from ptcore.errors import Abandoned, InvalidRequest, ServiceUnavailable
from server.engine.batch import GenerateBatch
from server.engine.outputs import Collected
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.stats import BatchStats
from tests.helpers import drive

EOS, WORD = 0, 1  # the scripted vocabulary: 0 ends a request, 1..3 are words
V = 4


class Letters:
    """A tokenizer for the script: token t decodes to one letter."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("_abc"[t] for t in ids if not (skip_special_tokens and t == EOS))


@dataclass(frozen=True)
class Prompt:
    task_id: str
    key: tuple = ()
    labels: tuple = ()
    version: int = 1


def generate(task: str, steps: int, max_new_tokens: int = 100, **params) -> Request:
    """A request whose row emits WORD for steps - 1 tokens, then EOS."""
    return Request.generate(Prompt(task, (task, 1, "")), [steps], SamplingParams(max_new_tokens, **params))


def classify(task: str) -> Request:
    return Request.classify(Prompt(task, (task, 1, "")), [0])


class ScriptedBackend:
    """Row r chooses WORD until its script runs out, then EOS; records every call."""

    max_len = None
    logits_device = torch.device("cpu")

    def __init__(self, max_running: int = 4, admits_while_running: bool = True):
        self.max_running = max_running
        self.admits_while_running = admits_while_running
        self.left: list[int] = []  # per row: tokens still to emit, EOS included
        self.calls: list[tuple] = []
        self.fail_next: str | None = None  # "prefill" or "decode": that call raises once

    @property
    def rows(self) -> int:
        return len(self.left)

    def fits(self, request, admitted) -> bool:
        if not self.admits_while_running and self.rows:
            return False
        return self.rows + len(admitted) < self.max_running

    def _logits(self, rows: range) -> torch.Tensor:
        logits = torch.zeros(len(rows), V)
        for j, r in enumerate(rows):
            logits[j, WORD if self.left[r] > 1 else EOS] = 1.0
            self.left[r] -= 1
        return logits

    def prefill(self, requests) -> torch.Tensor:
        self.calls.append(("prefill", [r.prompt.task_id for r in requests]))
        if self.fail_next == "prefill":
            self.fail_next = None
            raise RuntimeError("prefill broke")
        first = self.rows
        self.left.extend(r.input_ids[0] for r in requests)
        return self._logits(range(first, self.rows))

    def decode(self, tokens) -> torch.Tensor:
        self.calls.append(("decode", self.rows))
        if self.fail_next == "decode":
            self.fail_next = None
            raise RuntimeError("decode broke")
        assert tokens == [WORD] * self.rows  # every running row feeds back what it chose
        return self._logits(range(self.rows))

    def keep(self, order) -> None:
        self.calls.append(("keep", list(order)))
        self.left = [self.left[i] for i in order]

    def scrub(self, rows) -> None:
        self.calls.append(("scrub", list(rows)))


class Labels:
    """Classifies every request as its task id; records batches."""

    def __init__(self):
        self.batches: list[list[str]] = []

    def run(self, requests):
        self.batches.append([r.prompt.task_id for r in requests])
        return [r.prompt.task_id for r in requests]


def make(max_running=4, admits_while_running=True, max_batch_size=8, max_wait_s=0.0):
    backend = ScriptedBackend(max_running, admits_while_running)
    loaded = SimpleNamespace(eos_token_ids=frozenset({EOS}), tokenizer=Letters(), device=torch.device("cpu"))
    scheduler = Scheduler(GenerateBatch(backend, loaded), Labels(), max_batch_size, max_wait_s, BatchStats())
    return scheduler, backend


def test_requests_join_between_steps_and_leave_as_soon_as_they_finish():
    scheduler, backend = make()
    requests = [generate("a", 3), generate("b", 1), generate("c", 2)]
    results, log = drive(scheduler, requests, arrivals=[0, 0, 1])
    assert [r.text for r in results] == ["aa", "", "a"]
    assert [r.finish_reason for r in results] == ["stop"] * 3
    # iteration 0: a and b prefill (b's first token is EOS: it leaves at once), a decodes;
    # iteration 1: c joins beside a, both decode and both end
    assert log == [(0, "join", 0), (0, "join", 1), (0, "leave", 1), (1, "leave", 0), (1, "join", 2),
                   (1, "leave", 2)]  # fmt: skip
    assert backend.calls == [("prefill", ["a", "b"]), ("keep", [0]), ("decode", 1), ("prefill", ["c"]),
                             ("decode", 2), ("keep", [])]  # fmt: skip
    assert scheduler.running() == 0


def test_max_new_tokens_ends_a_request_with_length():
    scheduler, _ = make()
    (result,), _ = drive(scheduler, [generate("a", 10, max_new_tokens=3)])
    assert (result.token_ids, result.finish_reason) == ([WORD] * 3, "length")


def test_admission_is_in_arrival_order_and_bounded_by_room():
    scheduler, backend = make(max_running=2)
    requests = [generate("a", 3), generate("b", 3), generate("c", 1), generate("d", 1)]
    _, log = drive(scheduler, requests)
    joins = [(step, i) for step, event, i in log if event == "join"]
    # c and d wait for room; d does not overtake c although both would fit together later
    assert joins == [(0, 0), (0, 1), (2, 2), (2, 3)]
    assert [c for c in backend.calls if c[0] == "prefill"] == [("prefill", ["a", "b"]), ("prefill", ["c", "d"])]


def test_a_backend_that_admits_only_into_an_empty_batch():
    scheduler, backend = make(admits_while_running=False)
    requests = [generate("a", 3), generate("b", 1)]
    _, log = drive(scheduler, requests, arrivals=[0, 1])
    assert [(s, i) for s, e, i in log if e == "join"] == [(0, 0), (2, 1)]  # b waits until a is done


def test_classify_runs_between_decode_steps_in_batches_of_at_most_max_batch_size():
    scheduler, backend = make(max_batch_size=2)
    requests = [generate("g", 4), classify("x"), classify("y"), classify("z")]
    results, log = drive(scheduler, requests)
    assert [results[1], results[2], results[3]] == ["x", "y", "z"]
    assert scheduler.classifier.batches == [["x", "y"], ["z"]]
    leaves = {i: s for s, e, i in log if e == "leave"}
    assert leaves == {1: 0, 2: 0, 3: 1, 0: 2}  # the generation went on while they were answered
    assert scheduler.stats.snapshot()["requests"] == 4


def test_an_aborted_row_is_dropped_before_the_next_step():
    scheduler, backend = make()
    collected = scheduler.collect()
    keep, leave = generate("keep", 5), generate("leave", 50)
    scheduler.submit(keep)
    scheduler.submit(leave)
    scheduler.iteration()
    scheduler.abort(leave.id)  # what the HTTP side sends when its client goes away
    scheduler.iteration()
    with pytest.raises(Abandoned):
        collected.answer(leave.id, timeout=0)
    assert backend.calls[2] == ("keep", [0])  # its row was freed before the second decode step
    assert backend.calls[3] == ("decode", 1)
    while keep.id not in collected.finals:
        scheduler.iteration()
    assert collected.answer(keep.id).token_ids == [WORD] * 4


def test_an_aborted_request_in_the_queue_takes_no_room():
    scheduler, backend = make(max_running=1)
    collected = scheduler.collect()
    gone, wanted = generate("gone", 2), generate("wanted", 2)
    scheduler.submit(gone)
    scheduler.submit(wanted)
    scheduler.abort(gone.id)
    results, _ = drive(scheduler, [wanted], collected=collected)
    assert results[0].token_ids == [WORD]
    assert backend.calls[0] == ("prefill", ["wanted"])
    with pytest.raises(Abandoned):
        collected.answer(gone.id, timeout=0)


def test_a_failing_prefill_fails_only_its_newcomers():
    scheduler, backend = make()
    collected = scheduler.collect()
    old = generate("old", 4)
    scheduler.submit(old)
    scheduler.iteration()
    backend.fail_next = "prefill"
    new = generate("new", 2)
    scheduler.submit(new)
    scheduler.iteration()
    with pytest.raises(RuntimeError, match="prefill broke"):
        collected.answer(new.id, timeout=0)
    while old.id not in collected.finals:
        scheduler.iteration()
    assert collected.answer(old.id).token_ids == [WORD] * 3


def test_a_failing_decode_step_fails_every_running_row_and_the_loop_goes_on():
    scheduler, backend = make()
    a, b = generate("a", 5), generate("b", 5)
    backend.fail_next = "decode"
    results, _ = drive(scheduler, [a, b])
    assert [str(r) for r in results] == ["decode broke", "decode broke"]
    assert scheduler.running() == 0 and backend.rows == 0
    assert backend.calls[1:4] == [("decode", 2), ("scrub", [0, 1]), ("keep", [])]  # nothing left in their slots
    (after,), _ = drive(scheduler, [generate("c", 2)])
    assert after.token_ids == [WORD]


def test_streaming_gets_every_piece_once_and_the_pieces_add_up():
    scheduler, _ = make()
    collected = scheduler.collect()
    streamed, plain = generate("s", 6), generate("p", 6)
    streamed.stream = True
    results, _ = drive(scheduler, [streamed, plain], collected=collected)
    records = [o for o in collected.records if o.request_id == streamed.id]
    # a record after each step that settled text, then the last one, with the rest of the text
    assert [o.text for o in records] == ["aa", "a", "a", "a", ""]
    assert [o.finished for o in records] == [False] * 4 + [True]
    assert "".join(o.text for o in records) == results[0].text == "aaaaa"
    assert [t for o in records for t in o.token_ids] == results[0].token_ids
    # a request that is not streamed gets one record, its last
    assert [o.finished for o in collected.records if o.request_id == plain.id] == [True]


def test_stop_fails_queued_and_running_work_and_refuses_new_work():
    scheduler, backend = make(max_running=1, max_wait_s=0.0)
    gate, decoding = threading.Event(), threading.Event()
    real_decode = backend.decode

    def gated_decode(tokens):
        decoding.set()
        assert gate.wait(60), "the test never opened the gate"
        return real_decode(tokens)

    backend.decode = gated_decode
    collected = Collected()
    scheduler.start(collected)
    running = scheduler.submit(generate("running", 100))
    assert decoding.wait(60), "the running request never reached a decode step"
    queued = scheduler.submit(generate("queued", 2))
    stopper = threading.Thread(target=scheduler.stop)
    stopper.start()
    gate.set()  # the step in progress finishes; then stop fails what is left
    stopper.join(60)
    for request_id in (running, queued):
        with pytest.raises(ServiceUnavailable, match="shutting down"):
            collected.answer(request_id, timeout=60)
    with pytest.raises(ServiceUnavailable):
        scheduler.submit(generate("late", 2))


def test_the_loop_thread_computes_on_the_threads_it_was_given():
    backend = ScriptedBackend()
    loaded = SimpleNamespace(eos_token_ids=frozenset({EOS}), tokenizer=Letters(), device=torch.device("cpu"))
    scheduler = Scheduler(GenerateBatch(backend, loaded), Labels(), 8, 0.0, BatchStats(), threads=5)
    seen, real_prefill = [], backend.prefill

    def prefill(requests):
        seen.append(torch.get_num_threads())
        return real_prefill(requests)

    backend.prefill = prefill
    collected = Collected()
    scheduler.start(collected)
    try:
        collected.answer(scheduler.submit(generate("a", 2)), timeout=60)
    finally:
        scheduler.stop()
    assert seen == [5]


def test_a_sink_that_fails_loses_only_those_records_and_the_loop_goes_on():
    scheduler, _ = make()
    collected = scheduler.collect()
    real_put, failures = collected.put, []

    def put_failing_once(outputs):
        if not failures:
            failures.append(outputs)
            raise RuntimeError("Event loop is closed")
        real_put(outputs)

    collected.put = put_failing_once
    first = generate("first", 1)
    scheduler.submit(first)
    scheduler.iteration()
    assert [o.request_id for o in failures[0]] == [first.id] and first.id not in collected.finals
    results, _ = drive(scheduler, [generate("after", 3)], collected=collected)
    assert results[0].text == "aa"


def test_a_row_whose_sampling_fails_fails_alone(monkeypatch):
    import server.engine.batch

    real = server.engine.batch.sample

    def sample(logits, params, generators):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("sampling blew up")
        return real(logits, params, generators)

    monkeypatch.setattr(server.engine.batch, "sample", sample)
    scheduler, _ = make()
    bad, good = generate("bad", 4, temperature=1.0, seed=666), generate("good", 4)
    results, log = drive(scheduler, [bad, good])
    assert isinstance(results[0], RuntimeError) and str(results[0]) == "sampling blew up"
    assert results[1].token_ids == [WORD] * 3
    assert log[:3] == [(0, "join", 0), (0, "leave", 0), (0, "join", 1)]


def test_a_row_with_non_finite_logits_has_its_state_scrubbed_before_it_leaves():
    scheduler, backend = make()
    real = backend._logits

    def logits(rows):
        out = real(rows)
        if len(backend.calls) == 2:  # the first decode step: row 1 comes out NaN
            out[1] = float("nan")
        return out

    backend._logits = logits
    results, _ = drive(scheduler, [generate("a", 3), generate("b", 3), generate("c", 3)])
    assert isinstance(results[1], InvalidRequest) and "NaN or Inf" in str(results[1])
    assert [r.token_ids for r in (results[0], results[2])] == [[WORD] * 2] * 2
    assert backend.calls[1:4] == [("decode", 3), ("scrub", [1]), ("keep", [0, 2])]
