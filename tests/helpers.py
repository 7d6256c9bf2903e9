"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os

import torch

from server.engine.backends import make_batch
from server.engine.classify import Classifier
from server.engine.scheduler import Scheduler
from server.engine.stats import BatchStats


def make_scheduler(loaded, engine: str = "continuous", max_batch_size: int = 64, max_wait_s: float = 0.0,
                   max_classify_rows: int = 256, **batch_options) -> Scheduler:  # fmt: skip
    """The real scheduler over a real backend, not started: `drive` runs its loop
    on the test's thread. engine: "continuous" (slot backend) or "static"
    (Hugging Face backend). PTSERVE_COMPILE=true (bench/gpu_check.sh) compiles
    every decode step, each from a clean torch.compile cache, so that no test
    falls back to eager after too many recompilations."""
    options = dict(max_running=4, max_seq_len=128, prefix_cache_size=8,
                   compile=os.environ.get("PTSERVE_COMPILE", "false").lower() == "true")  # fmt: skip
    options.update(batch_options)
    if options["compile"]:
        torch._dynamo.reset()
    batch = make_batch(loaded, engine, **options)
    return Scheduler(batch, Classifier(loaded, max_classify_rows), max_batch_size, max_wait_s, BatchStats())


def drive(scheduler: Scheduler, requests: list, arrivals: list[int] | None = None):
    """Run the scheduler's loop on this thread until every request is answered;
    request i is submitted before iteration arrivals[i] (default 0). -> (results,
    one per request: its result or its exception; log of (iteration, "join" |
    "leave", request index), in request order within an iteration)."""
    arrivals = arrivals or [0] * len(requests)
    pending = sorted(range(len(requests)), key=lambda i: arrivals[i])
    joined, left, log = set(), set(), []
    step = 0
    while len(left) < len(requests):
        while pending and arrivals[pending[0]] <= step:
            scheduler.submit(requests[pending.pop(0)])
        if scheduler.queue_depth() or scheduler.running():
            scheduler.iteration()
        running = {id(r) for r in scheduler.batch.requests} if scheduler.batch is not None else set()
        for i, r in enumerate(requests):
            if i not in joined and (id(r) in running or r.future.done()):
                joined.add(i)
                log.append((step, "join", i))
            if i not in left and r.future.done():
                left.add(i)
                log.append((step, "leave", i))
        step += 1
    return [r.future.exception() or r.future.result() for r in requests], log
