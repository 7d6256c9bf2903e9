"""What several test modules share: the correctness oracle, prompts and
artifacts to test with, real servers (uvicorn, redis-server) on free ports,
and ways to drive the engine. Fixtures stay in conftest.py; no test module
imports another.

Only torch and the prompt-store and ptcore packages are imported at the top:
bench/without_server_deps.py runs the engine's tests with FastAPI, uvicorn,
pydantic and redis made unimportable, and conftest.py imports this module.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest
import torch

from prompt_store.artifact import artifact_bytes, make_artifact, read_artifact
from prompt_store.template import parse_template, render
from ptcore.task_prompt import task_prompt
from server.engine.backends import make_batch
from server.engine.classify import Classifier
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.stats import BatchStats

# --- the correctness oracle (DESIGN.md) -------------------------------------
# One request computed ALONE, with no KV cache and no padding, from
# inputs_embeds = render(template, h, x), recomputing the whole sequence at
# every step. Written independently of server/engine/.


def alone_embeds(model, rows: torch.Tensor, ids: list[int], vocab_size: int) -> torch.Tensor:
    """[1, T, H]: real ids embed normally, pseudo token i (id vocab_size + i) is rows[i]."""
    table = model.get_input_embeddings().weight
    vecs = [rows[i - vocab_size] if i >= vocab_size else table[i] for i in ids]
    return torch.stack(vecs).unsqueeze(0)


@torch.no_grad()
def alone_greedy(model, rows, ids, vocab_size, max_new_tokens, eos_ids) -> list[int]:
    """The greedy continuation of `ids`, recomputed from embeddings at every step."""
    embeds = alone_embeds(model, rows, ids, vocab_size)
    table = model.get_input_embeddings().weight
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
        token = int(logits.argmax())
        if token in eos_ids:
            break
        out.append(token)
        embeds = torch.cat([embeds, table[token].view(1, 1, -1)], dim=1)
    return out


@torch.no_grad()
def alone_label_logprobs(model, rows, ids, vocab_size, label_ids) -> list[float]:
    """Summed log-probability of each label's verbalizer tokens after `ids`."""
    scores = []
    for verbalizer in label_ids:
        embeds = alone_embeds(model, rows, ids + list(verbalizer), vocab_size)
        logp = torch.log_softmax(model(inputs_embeds=embeds, use_cache=False).logits[0].float(), dim=-1)
        n = len(ids)
        scores.append(sum(float(logp[n - 1 + j, t]) for j, t in enumerate(verbalizer)))
    return scores


def alone_label_scores(model, rows, ids, vocab_size, label_ids) -> list[float]:
    """Label probabilities: softmax over the labels' summed log-probabilities."""
    logprobs = alone_label_logprobs(model, rows, ids, vocab_size, label_ids)
    return torch.softmax(torch.tensor(logprobs, dtype=torch.float64), dim=0).tolist()


# --- prompts and artifacts ---------------------------------------------------

# pseudo tokens before, between and after fields; different prompt lengths
TEMPLATES = [
    ("[P:3]{input}[P:3]", {"input": "hello world"}),
    ("[P:2] Review: {input} [P:2] Sentiment:", {"input": "the quick brown fox jumps over the lazy dog"}),
    ("{premise}[P:3]{hypothesis}?[P:3]", {"premise": "a cat sat", "hypothesis": "is it a dog"}),
    ("[P:9]{input}", {"input": "x"}),
    ("Question: {input}[P:1]", {"input": "what is the return value of this function"}),
]


def random_prompt(loaded, template, task_type="generate", labels=None, seed=0, **meta):
    """An artifact with random rows on the scale of the model's embeddings."""
    m = parse_template(template).num_virtual_tokens
    weight = loaded.model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(m, weight.shape[1], generator=g) * float(weight.std()) * 2
    return make_artifact(rows, template=template, task_type=task_type, labels=labels, base_model=loaded.info, **meta)


def filled_artifact(fill: float, template="[P:2]{input}") -> bytes:
    """The bytes of a generate artifact for a 4-wide model whose rows all hold
    `fill` (read back with fill_of): tells stored versions apart."""
    base = {"name_or_path": "tiny", "hidden_size": 4, "vocab_size": 10}
    rows = torch.full((2, 4), fill)
    return artifact_bytes(make_artifact(rows, template=template, task_type="generate", base_model=base))


def fill_of(stored) -> float:
    """The fill of a stored filled_artifact."""
    return float(read_artifact(stored.data).embeddings[0, 0])


def make_adapter(model_dir, kind, path, seed=0):
    """A PeftModel on the tiny model with random (large) prompt weights, saved as PEFT saves it."""
    from peft import PromptEncoderConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    if kind == "PROMPT_TUNING":
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)
    else:
        config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32)
    peft_model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(path)
    return peft_model.eval()


# --- driving the engine ------------------------------------------------------


def submit_from_threads(scheduler, works) -> list:
    """One thread per work, all submitting together, as concurrent HTTP requests
    do; -> the results, in order."""
    futures = [None] * len(works)

    def submit(i):
        futures[i] = scheduler.submit(works[i])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(works))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [f.result(timeout=60) for f in futures]


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


def generate_requests(loaded, n, tasks=5, version=1, max_new=lambda i: 4 + 3 * (i % 4)) -> list[Request]:
    """n greedy requests over `tasks` tasks of TEMPLATES, with random prompts."""
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
    """The request's greedy tokens computed alone (alone_greedy above)."""
    return alone_greedy(loaded.model, request.prompt.rows, request.input_ids, loaded.vocab_size,
                        request.params.max_new_tokens, loaded.eos_token_ids)  # fmt: skip


LABEL_SETS = [
    {"positive": " good", "negative": " bad thing"},
    {"yes": "yes", "no": "no", "maybe": " maybe so"},
    {"a": " the return value of", "b": " b"},
]


def make_classify(loaded, i, labels, template, fields):
    artifact = random_prompt(loaded, template, "classify", labels, seed=100 + i)
    prompt = task_prompt(f"cls{i}", 1, artifact, loaded)
    return Request.classify(prompt, render(prompt.template, loaded.tokenizer, fields, loaded.vocab_size))


# --- real servers on loopback ports ------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The app served as `ptserve serve` serves it (same protocol and socket
    limits): a real uvicorn server on 127.0.0.1 and a free port, run in a thread."""

    def __init__(self, app):
        import uvicorn

        from server.api.http_server import server_config

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        where = {"host": "127.0.0.1", "port": self.port, "log_level": "warning"}
        settings = app.state.settings.model_copy(update=where)
        self._server = uvicorn.Server(server_config(app, settings))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self):
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self._server.should_exit = True
        self._thread.join(timeout=30)


def live_server(loaded, store: str, **settings):
    """The app `ptserve serve` builds for `loaded`, on a free loopback port: a context manager."""
    from server.api.app import create_app
    from server.settings import Settings

    return LiveServer(create_app(Settings(model=loaded.info["name_or_path"], store=store, **settings), loaded))


def start_redis(port: int | None = None, *options: str) -> tuple[subprocess.Popen, str]:
    """A real redis-server on a loopback port (a free one by default), with no
    persistence; `options` are more redis-server flags (e.g. "--replicaof", HOST, PORT)."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail(
            "redis-server is not installed (apt-get install -y redis-server) and PTSERVE_TEST_REDIS_URL is unset"
        )
    port = port or free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *options],
        stdout=subprocess.DEVNULL,
    )
    _wait_for_port(port)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_sentinel(folder, master_port: int, service: str = "ptserve") -> tuple[subprocess.Popen, int]:
    """One Redis Sentinel (the redis-server binary in sentinel mode) watching the
    master on `master_port` alone (quorum 1), quick to fail over: it calls the
    master down after 500 ms. Its config file, which it rewrites, goes in `folder`."""
    port = free_port()
    conf = os.path.join(folder, f"sentinel-{port}.conf")
    with open(conf, "w") as f:
        f.write(
            f"port {port}\nbind 127.0.0.1\nsentinel monitor {service} 127.0.0.1 {master_port} 1\n"
            f"sentinel down-after-milliseconds {service} 500\nsentinel failover-timeout {service} 2000\n"
        )
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", conf, "--sentinel"], stdout=subprocess.DEVNULL
    )
    _wait_for_port(port)
    return proc, port


def _wait_for_port(port: int) -> None:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.05)


# --- faults --------------------------------------------------------------------


def deny(monkeypatch, root, error=PermissionError) -> None:
    """Every filesystem call on a path under `root` fails, as for a store root the
    server may not read (tests run as root, where chmod does not deny anything)."""
    import builtins
    import io

    root = os.fspath(root)

    def guarded(real):
        def call(path, *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(root):
                raise error(errno.EACCES, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)

        return call

    for name in ("listdir", "scandir", "stat", "lstat", "open", "mkdir", "access"):
        monkeypatch.setattr(os, name, guarded(getattr(os, name)))
    monkeypatch.setattr(builtins, "open", guarded(builtins.open))
    monkeypatch.setattr(io, "open", guarded(io.open))
