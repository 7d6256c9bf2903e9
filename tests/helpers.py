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

# --- the correctness oracle --------------------------------------------------
# The oracle: one request computed ALONE, with no KV cache and no padding, from
# inputs_embeds = render(template, h, x) (real ids embed as the model embeds
# them, pseudo token i is the prompt's row h[i]), recomputing the whole
# sequence at every step. What it answers:
# - generate: the greedy continuation, the argmax of the last position's logits
#   appended at each step until an end-of-sequence token or the token limit;
# - classify, causal LM: a label's score is the summed log-probability of its
#   verbalizer tokens following the rendered sequence, each token given all
#   before it; the label probabilities are the softmax over those scores;
# - classify, masked LM: a label's score is the log-probability of its single
#   verbalizer token at the [MASK] position (tests/ptcore/test_scoring.py and
#   tests/server/test_families.py compute it; encoders score their linear head
#   over the state at the [MASK] or the mean state instead).
# Written independently of server/engine/.
#
# How anything is compared with it, or any float computed two ways (the rule,
# stated here once; other modules refer to it):
# 1. Floats computed in DIFFERENT SHAPES - a batch against each row alone,
#    another padding or prompt length, a KV cache against recomputation, packed
#    against separate projections, a compiled or padded step against eager -
#    agree to FLOAT_RTOL of their scale (float_mismatch), never bit for bit:
#    BLAS/oneDNN choose a matrix product's kernel, and with it how its sums are
#    blocked, by its rows and columns and by the CPU (MKL takes other paths on
#    an AMD EPYC than on an Intel Xeon), so the same number can differ in its
#    last bits. A test that uses the tolerance for a masking- or
#    position-sensitive result also shows it FAILS that result computed with a
#    padding position left visible (visible_padding) or a position shifted.
# 2. A comparison stays exact only with a comment saying why it is exact on
#    every CPU: the same op on the same shapes and inputs (deterministic), a pure
#    copy, gather or concatenation of the same numbers, or integers.
# 3. Argmax decisions are integers and compared exactly, except where the two
#    best values are within TIE_RTOL of their scale: there rounding decides
#    between them, and the other choice is no error. Greedy tokens: from a step
#    where the oracle's top-2 logit margin is that small, a different token
#    (with whatever follows it) passes (greedy_mismatch, used by
#    tests/server/test_oracle.py). Modules that compare `== oracle_tokens(...)`
#    / `== alone_greedy(...)` directly rely on their inputs having no such step;
#    none has today (the smallest top-2 margin over the suite's oracle steps is
#    1.9e-4 of the logits' scale, tiny GPT-2 with logits up to 16.5).
#    Predicted labels: an accuracy counted in other batch shapes may differ by
#    the examples whose two best label scores nearly tie (label_near_tie,
#    assert_same_accuracy; the trainer tests meet margins of 3e-6).

# Float32 eps is 1.2e-7. Across the CPUs' kernel choices (simulated with MKL's
# AVX-512, AVX2 and SSE4.2 paths, oneDNN capped to AVX2, one thread or many)
# the largest difference seen between shapes was 5e-6 of the scale for label
# scores and 9e-6 for hidden states after 36 decode steps (tens of ulps, after
# every layer of the tiny models); 1e-4 is 10 to 20 times that. The bugs these
# comparisons exist for move results by 3e-3 of their scale or more (a visible
# padding position, positions counted from the padded start, a query that sees
# a later key, a step at the wrong position): the mutation checks prove this
# tolerance fails them.
FLOAT_RTOL = 1e-4
# Two logits that each move by at most ~1e-5 of the scale between shapes can
# swap only when they are within 2e-5 of it; 1e-4 leaves 5 times that.
TIE_RTOL = 1e-4


def float_mismatch(got, want, rtol: float = FLOAT_RTOL) -> str | None:
    """None when `got` and `want` (tensors or sequences of floats, same shape)
    agree to rtol of their scale: |got - want| <= rtol * max(1, max |want|)
    everywhere; else what differs, for the assertion's message. The scale is
    the whole tensor's: a log-softmax's error follows the logits' magnitude,
    not the magnitude of each log-probability."""
    got = torch.as_tensor(got, dtype=torch.float64).cpu()
    want = torch.as_tensor(want, dtype=torch.float64).cpu()
    if got.shape != want.shape:
        return f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}"
    if want.numel() == 0:
        return None
    if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
        return None if torch.equal(got, want) else f"non-finite values differ: {got} vs {want}"
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    if err <= rtol * scale:
        return None
    values = f": {got.tolist()} vs {want.tolist()}" if want.numel() <= 16 else ""
    return f"max difference {err:.3g} > {rtol:g} of scale {scale:.3g}{values}"


def top2_margin(logits: torch.Tensor) -> float:
    """The top-2 margin of `logits` [V] as a share of their scale (max(1, max |logit|))."""
    top = logits.detach().float().topk(2).values
    return float(top[0] - top[1]) / max(1.0, float(logits.detach().float().abs().max()))


def visible_padding(pack):
    """A broken ptcore.inputs.pack for mutation checks: the padding position
    next to each padded row's tokens is left visible (attention mask 1)."""

    def broken(seqs, offsets, vocab_size, device, left=True):
        ids, mask, positions = pack(seqs, offsets, vocab_size, device, left)
        mask = mask.clone()
        for b, seq in enumerate(seqs):
            if len(seq) < mask.shape[1]:
                mask[b, mask.shape[1] - len(seq) - 1 if left else len(seq)] = 1
        return ids, mask, positions

    return broken


def alone_embeds(model, rows: torch.Tensor, ids: list[int], vocab_size: int) -> torch.Tensor:
    """[1, T, H]: real ids embed normally, pseudo token i (id vocab_size + i) is rows[i]."""
    table = model.get_input_embeddings().weight
    vecs = [rows[i - vocab_size] if i >= vocab_size else table[i] for i in ids]
    return torch.stack(vecs).unsqueeze(0)


@torch.no_grad()
def alone_greedy(model, rows, ids, vocab_size, max_new_tokens, eos_ids, margins: list | None = None) -> list[int]:
    """The greedy continuation of `ids`, recomputed from embeddings at every step.
    margins: a list to append each step's top-2 margin to (top2_margin), the
    end-of-sequence step included."""
    embeds = alone_embeds(model, rows, ids, vocab_size)
    table = model.get_input_embeddings().weight
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
        if margins is not None:
            margins.append(top2_margin(logits))
        token = int(logits.argmax())
        if token in eos_ids:
            break
        out.append(token)
        embeds = torch.cat([embeds, table[token].view(1, 1, -1)], dim=1)
    return out


def greedy_mismatch(loaded, request, token_ids: list[int]) -> str | None:
    """None when `token_ids` are the oracle's greedy tokens for `request`, or
    agree with them up to a step where the oracle's top-2 margin is below
    TIE_RTOL (rule 3 above); else where they part."""
    margins: list[float] = []
    want = alone_greedy(loaded.model, request.prompt.rows, request.input_ids, loaded.vocab_size,
                        request.params.max_new_tokens, loaded.eos_token_ids, margins)  # fmt: skip
    got = list(token_ids)
    if got == want:
        return None
    step = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    if step < len(margins) and margins[step] < TIE_RTOL:
        return None  # a near tie: rounding picks the token
    margin = f"{margins[step]:.3g}" if step < len(margins) else "n/a"
    return f"step {step} (top-2 margin {margin} of the logits' scale): got {got}, the oracle {want}"


def label_near_tie(logprobs) -> bool:
    """Whether a classification's two best label scores (log-probabilities) are
    within TIE_RTOL of their scale, so that rounding picks its label (rule 3)."""
    top = sorted((float(x) for x in logprobs), reverse=True)[:2]
    return len(top) == 2 and top[0] - top[1] < TIE_RTOL * max(1.0, abs(top[0]), abs(top[1]))


def assert_same_accuracy(reported: float, recounted: float, ties: int, n: int) -> None:
    """Two accuracies over the same n examples, whose labels were picked in
    different batch shapes: equal, except that each of the `ties` examples whose
    labels nearly tie (label_near_tie) may count on either side (rule 3)."""
    assert abs(reported - recounted) * n <= ties + 1e-9, (reported, recounted, f"{ties} near ties of {n}")


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


def submit_from_threads(scheduler, works, collected) -> list:
    """One thread per work, all submitting together to a started scheduler, as
    concurrent HTTP requests do; -> the results, in order (read from `collected`,
    the sink the scheduler was started with)."""
    ids = [0] * len(works)

    def submit(i):
        ids[i] = scheduler.submit(works[i])

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(len(works))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [collected.answer(i, timeout=60) for i in ids]


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


def drive(scheduler: Scheduler, requests: list, arrivals: list[int] | None = None, collected=None):
    """Run the scheduler's loop on this thread until every request is answered;
    request i is submitted before iteration arrivals[i] (default 0). -> (results,
    one per request: its result or its exception; log of (iteration, "join" |
    "leave", request index), in request order within an iteration). The records
    go to `collected` (from scheduler.collect()), or a new Collected."""
    collected = collected or scheduler.collect()
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
            done = r.id in collected.finals
            if i not in joined and (id(r) in running or done):
                joined.add(i)
                log.append((step, "join", i))
            if i not in left and done:
                left.add(i)
                log.append((step, "leave", i))
        step += 1
    finals = [collected.finals[r.id] for r in requests]
    return [o.error if o.error is not None else o.result for o in finals], log


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
    import tempfile

    port = port or free_port()
    with tempfile.TemporaryFile() as output:  # read only if it does not start
        proc = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *options],
            stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
        _wait_for_port(port, proc, output)
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
    import tempfile

    with tempfile.TemporaryFile() as output:  # read only if it does not start
        proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", conf, "--sentinel"],
            stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
        _wait_for_port(port, proc, output)
    return proc, port


def _wait_for_port(port: int, proc: subprocess.Popen | None = None, output=None, timeout_s: float = 60.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:`port`. Raises
    RuntimeError if nothing does within timeout_s (a deadline far beyond any
    start) or `proc`, the server meant to listen there, exits first; the message
    has the port, the wait, and the process's exit code and output (`output`:
    the file its stdout and stderr go to). A process still running then is killed."""
    start = time.monotonic()
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError as e:
            error = e
        waited = time.monotonic() - start
        if proc is not None and proc.poll() is not None:
            state = f"it exited with code {proc.returncode} after {waited:.1f} s"
            break
        if waited > timeout_s:
            state = f"nothing accepted one within {waited:.1f} s"
            if proc is not None:
                proc.kill()
                proc.wait()
                state += " (the process, still running, is killed now)"
            break
        time.sleep(0.05)
    what = " ".join(map(str, proc.args)) if proc is not None and isinstance(proc.args, list) else "a server"
    message = f"waited for {what} to accept connections on 127.0.0.1:{port}: {state}; last connection error: {error}"
    if output is not None:
        output.seek(0)
        text = output.read().decode(errors="replace")
        message += f"; its output:\n{text[-4000:]}" if text else "; it wrote no output"
    raise RuntimeError(message)


def wait_until(condition, what: str, timeout_s: float = 60.0):
    """Poll `condition()` until it returns something true, and return that. A
    wait for an event, not for time: timeout_s is a deadline far beyond any
    expected wait, past which the test fails saying what it waited for."""
    start = time.monotonic()
    while not (result := condition()):
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"waited {timeout_s:g} s for {what}")
        time.sleep(0.01)
    return result


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
