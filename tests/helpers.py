"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import os

import torch

from prompt_store.template import render
from ptcore.task_prompt import task_prompt
from server.engine.backends import make_batch
from server.engine.classify import Classifier
from server.engine.request import Request, SamplingParams
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


# pseudo tokens before, between and after fields; different prompt lengths
TEMPLATES = [
    ("[P:3]{input}[P:3]", {"input": "hello world"}),
    ("[P:2] Review: {input} [P:2] Sentiment:", {"input": "the quick brown fox jumps over the lazy dog"}),
    ("{premise}[P:3]{hypothesis}?[P:3]", {"premise": "a cat sat", "hypothesis": "is it a dog"}),
    ("[P:9]{input}", {"input": "x"}),
    ("Question: {input}[P:1]", {"input": "what is the return value of this function"}),
]


def generate_requests(loaded, n, tasks=5, version=1, max_new=lambda i: 4 + 3 * (i % 4)) -> list[Request]:
    """n greedy requests over `tasks` tasks of TEMPLATES, with random prompts."""
    from tests.conftest import random_prompt

    out = []
    for i in range(n):
        template, fields = TEMPLATES[i % tasks % len(TEMPLATES)]
        prompt = task_prompt(
            f"t{i % tasks}", version, random_prompt(loaded, template, seed=i % tasks + 10 * version), loaded
        )
        ids = render(prompt.template, loaded.tokenizer, fields, loaded.vocab_size)
        out.append(Request.generate(prompt, ids, SamplingParams(max_new_tokens=max_new(i))))
    return out


def oracle_tokens(loaded, request) -> list[int]:
    """The request's greedy tokens computed alone (tests/oracle.py)."""
    from tests.oracle import alone_greedy

    return alone_greedy(loaded.model, request.prompt.rows, request.input_ids, loaded.vocab_size,
                        request.params.max_new_tokens, loaded.eos_token_ids)  # fmt: skip
