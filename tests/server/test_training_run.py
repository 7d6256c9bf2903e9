"""Training runs on the scheduler's thread (server/engine/training.py): passes
run between inference iterations, inference stays token-exact, a run can be
cancelled, and the share policy gives training only what it earned."""

from dataclasses import dataclass

import pytest
import torch

from ptcore.errors import Abandoned, Overloaded
from ptuning.data import Example
from ptuning.train import Done, EpochEnd, PromptTrainer, Step, TrainConfig
from server.engine import training
from server.engine.backends import make_batch
from server.engine.classify import Classifier
from server.engine.scheduler import Scheduler
from server.engine.stats import BatchStats
from server.engine.training import TrainingRun, TrainingShare
from tests.helpers import drive, generate_requests, greedy_mismatch


@dataclass
class Tick:
    n: int


@dataclass
class Finished:
    result: str


def ticks(n: int, log: list):
    for i in range(n):
        log.append(i)
        yield Tick(i)
    yield Finished(f"done after {n}")


def scheduler_for(loaded, share=0.5) -> Scheduler:
    batch = make_batch(loaded, "continuous", max_running=4, max_seq_len=128)
    return Scheduler(batch, Classifier(loaded), 8, 0.0, BatchStats(), train_share=share)


def test_with_no_inference_a_run_goes_pass_after_pass_to_its_result(loaded):
    s = scheduler_for(loaded)
    collected, log = s.collect(), []
    run_id = s.submit_training(TrainingRun(ticks(3, log)))
    while run_id not in collected.finals:
        s.iteration()
    records = [o for o in collected.records if o.request_id == run_id]
    assert [o.event for o in records[:-1]] == [Tick(0), Tick(1), Tick(2)]
    assert (records[-1].result, records[-1].error) == ("done after 3", None)
    s.submit_training(TrainingRun(ticks(1, [])))
    with pytest.raises(Overloaded, match="already running"):  # one run at a time
        s.submit_training(TrainingRun(ticks(1, [])))


def test_a_cancelled_run_stops_before_its_next_pass(loaded):
    s = scheduler_for(loaded)
    collected, log = s.collect(), []
    run_id = s.submit_training(TrainingRun(ticks(100, log)))
    s.iteration()
    s.iteration()
    s.abort(run_id)
    drive(s, generate_requests(loaded, 1), collected=collected)  # the next iteration applies the abort first
    assert log == [0, 1]
    assert isinstance(collected.finals[run_id].error, Abandoned)


def test_a_failing_pass_fails_the_run_and_inference_goes_on(loaded):
    def broken():
        yield Tick(0)
        raise RuntimeError("out of memory")

    s = scheduler_for(loaded)
    collected = s.collect()
    run_id = s.submit_training(TrainingRun(broken()))
    works = generate_requests(loaded, 3)
    results, _ = drive(s, works, collected=collected)
    while run_id not in collected.finals:
        s.iteration()
    assert str(collected.finals[run_id].error) == "out of memory"
    assert [greedy_mismatch(loaded, w, r.token_ids) for w, r in zip(works, results)] == [None] * 3


def test_inference_is_token_exact_before_during_and_after_a_real_training_run(loaded):
    """The trainer's passes run on the served model between decode steps; the
    model is frozen, so every answer equals the request computed alone."""
    config = TrainConfig(task_type="generate", template="[P:2]{input}[P:2]", epochs=2, batch_size=4,
                         micro_batch_size=2, progress=False)  # fmt: skip
    data = [Example({"input": f"word {i}"}, f" answer {i % 3}", i + 1) for i in range(8)]
    weights = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    s = scheduler_for(loaded, share=0.5)
    collected = s.collect()
    first, last = generate_requests(loaded, 4), generate_requests(loaded, 4)
    before = drive(s, first, collected=collected)[0]
    run_id = s.submit_training(TrainingRun(PromptTrainer(loaded, config).steps(data, data[:4])))
    works = generate_requests(loaded, 6)
    during, _ = drive(s, works, arrivals=[0, 0, 1, 2, 4, 6], collected=collected)
    # passes ran between the decode steps (how many depends on how long each took: the share is of time)
    assert sum(o.request_id == run_id for o in collected.records) > 0
    while run_id not in collected.finals:
        s.iteration()
    after = drive(s, last, collected=collected)[0]
    for results, reqs in ((before, first), (during, works), (after, last)):
        assert [greedy_mismatch(loaded, w, r.token_ids) for w, r in zip(reqs, results)] == [None] * len(reqs)
    events = [o.event for o in collected.records if o.request_id == run_id and o.event is not None]
    assert sum(isinstance(e, Step) for e in events) == 2 * 2 * 2  # epochs x batches x micro-batches
    assert [e.metrics["epoch"] for e in events if isinstance(e, EpochEnd)] == [0, 1, 2]
    assert collected.finals[run_id].result.artifact.embeddings.shape[0] == 4
    assert all(torch.equal(v, weights[k]) for k, v in loaded.model.state_dict().items())  # frozen
    assert not isinstance(events[-1], Done)  # Done is the last record's result, not an event


def test_passes_are_small_while_inference_runs_and_whole_when_idle(loaded, monkeypatch):
    """A pass asks the run its size: busy_pass_size while requests run (they
    wait for the pass), idle_pass_size (a whole batch up to it) once inference is quiet."""
    monkeypatch.setattr(training, "QUIET_S", 0.0)  # quiet as soon as no request runs or waits
    s = scheduler_for(loaded, share=1.0)  # every iteration may train: the sizes alone are under test
    collected, asked = s.collect(), []
    run = TrainingRun(busy_pass_size=1, idle_pass_size=8)

    def sized():
        while True:
            asked.append((s.running() > 0, run.pass_size()))
            yield Tick(len(asked))

    run.events = sized()
    s.submit_training(run)
    drive(s, generate_requests(loaded, 2), collected=collected)
    assert {size for running, size in asked if running} == {1}
    s.iteration()
    assert asked[-1] == (False, 8)  # a whole batch, up to the idle cap


def test_inference_counts_as_running_until_it_has_been_quiet(monkeypatch):
    share, now = TrainingShare(0.25), [100.0]
    monkeypatch.setattr(training.time, "monotonic", lambda: now[0])
    assert not share.busy(False)  # no inference yet
    share.earned(0.1)
    assert share.busy(True) and share.busy(False)  # a client's next request is on its way
    assert share.idle_wait() == 0.0  # it has credit: a pass may run now
    share.spent(1.0, inference_busy=True)
    assert share.idle_wait() == pytest.approx(training.QUIET_S)  # no credit: wait for the quiet
    now[0] += training.QUIET_S
    assert not share.busy(False) and share.busy(True) and share.idle_wait() == 0.0


def test_training_gets_its_share_of_the_time_inference_runs():
    share = TrainingShare(0.25)
    assert share.may_run(inference_busy=False)  # nothing else to do: train
    assert not share.may_run(inference_busy=True)  # nothing earned yet
    share.earned(0.3)  # 0.3 s of inference earns 0.1 s of training at a quarter of the time
    assert share.inference_seconds == pytest.approx(0.3)
    assert share.credit == pytest.approx(0.1) and share.may_run(inference_busy=True)
    share.spent(0.15, inference_busy=True)
    assert not share.may_run(inference_busy=True)  # in debt until inference earns it back
    share.spent(5.0, inference_busy=False)  # passes while idle cost nothing
    assert (share.passes, share.training_seconds) == (2, pytest.approx(5.15))
    assert share.credit == pytest.approx(-0.05)
    share.earned(100.0)
    assert share.credit == 1.0  # at most a second piles up
