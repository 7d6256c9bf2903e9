"""Engine benchmark: generated tokens/s, time to first token and per-token
latency, side by side in one run, for

  (a) ptserve's continuous engine, requests over several tasks (mixed);
  (b) the same requests, all of ONE task;
  (c) Hugging Face `generate` on one mixed batch, with inputs_embeds;
  (d) one task per forward pass: HF `generate` per task, one task after another
      (how PEFT serves prompt tuning);
  (e) one request at a time through ptserve's engine (--serial N: the first N);
  (f) on CUDA: (a) with the decode step run eagerly instead of from CUDA graphs;
  (g) with --compile: (a) with the decode step fused by torch.compile;
  (h) on CUDA: (a) with cuDNN attention allowed, PyTorch's default (ptserve
      turns it off when it loads a model: see ptcore/model.py); the captured
      decode step is the same, only the eager work (prefill) differs;
  (p) requests arriving over time (Poisson, --rate per second) through the real
      scheduler, if --rate is given.

On CUDA it also checks that graph replays give the tokens of the eager step
at the same shapes (and says how many agree with the eager step at exact
shapes, where bf16 rounding may differ).

Models have random weights of a given shape (nothing is downloaded). Every
request generates exactly --new-tokens tokens (EOS is disabled), greedy.

    python -m bench.engine --shape gpt2-small --concurrency 32           # CPU
    python -m bench.engine --shape llama-1b --device cuda --dtype bfloat16 \\
        --tasks 8 --prompt-len 20 --input-len 64 --new-tokens 128 --concurrency 64 --write

Latencies: TTFT = first token chosen - request submitted; per-token =
(finished - first token) / (new tokens - 1). For (c) and (d), whose requests
share one `generate` call per batch, a logits processor stamps each step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from bench.report import report
from prompt_store.artifact import make_artifact
from ptcore import cpu_threads
from ptcore.inputs import embed, pack, prompt_table
from ptcore.model import LoadedModel, avoid_cudnn_attention, describe_model
from ptcore.task_prompt import task_prompt
from server.engine.backends import make_batch
from server.engine.batch import GenerateBatch
from server.engine.classify import Classifier
from server.engine.outputs import Collected
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.stats import BatchStats

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {
    # the 1.1B Llama shape
    "llama-1b": lambda: LlamaForCausalLM(LlamaConfig(
        hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048)),
    # the default model's shape (SmolLM2-135M): the real weights are not needed for timings
    "smollm2-135m": lambda: LlamaForCausalLM(LlamaConfig(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)),
    "gpt2-small": lambda: GPT2LMHeadModel(GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257)),
    "tiny": lambda: LlamaForCausalLM(LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=512, max_position_embeddings=512)),
}  # fmt: skip


class NoText:
    """Stands in for a tokenizer: the benchmark needs no text, and no EOS."""

    eos_token_id = None
    bos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return ""


def build(shape: str, device: str, dtype: torch.dtype) -> LoadedModel:
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: a 1B model's random init on the CPU takes long
        model = SHAPES[shape]()
    model = model.to(dtype=dtype).eval().requires_grad_(False)
    avoid_cudnn_attention(torch.device(device))  # as load_model does: the server runs this way
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = None  # every request generates exactly --new-tokens
    pos = getattr(model.config, "max_position_embeddings", None) or model.config.n_positions
    return LoadedModel(model, NoText(), torch.device(device), dtype, describe_model(model, shape), pos, "causal")


def make_requests(loaded, tasks: int, n: int, prompt_len: int, input_len: int, new: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = loaded.model.get_input_embeddings().weight
    prompts = []
    for t in range(tasks):
        rows = torch.randn(prompt_len, weight.shape[1], generator=g) * float(weight.float().std())
        artifact = make_artifact(rows, template=f"[P:{prompt_len}]{{input}}", task_type="generate",
                                 base_model=loaded.info)  # fmt: skip
        prompts.append(task_prompt(f"task{t}", 1, artifact, loaded))
    V = loaded.vocab_size
    pseudo = list(range(V, V + prompt_len))
    rng = random.Random(seed)
    return [
        (prompts[i % tasks], pseudo + [rng.randrange(V) for _ in range(input_len)], SamplingParams(max_new_tokens=new))
        for i in range(n)
    ]


def agreement(xs: list[list[int]], ys: list[list[int]]) -> str:
    same = sum(x == y for x, y in zip(xs, ys))
    firsts = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(xs, ys) if x != y]
    where = f"; first differences at tokens {sorted(firsts)}" if firsts else ""
    return f"{same}/{len(xs)} requests token-identical{where}"


def summarize(name: str, wall: float, tokens: int, ttft: list[float], per_token: list[float], step_ms=None,
              prefill_ms=None) -> dict:  # fmt: skip
    q = lambda xs, p: statistics.quantiles(xs, n=100, method="inclusive")[p - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    return {
        "mode": name, "tokens_per_s": tokens / wall, "wall_s": wall,
        "ttft_p50_ms": 1000 * q(ttft, 50), "ttft_p99_ms": 1000 * q(ttft, 99),
        "tpot_p50_ms": 1000 * q(per_token, 50), "tpot_p99_ms": 1000 * q(per_token, 99), "step_ms": step_ms,
        "prefill_ms": prefill_ms,
    }  # fmt: skip


def sync(loaded):
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()


def make_batcher(loaded, args, graphs: bool, compile: bool = False, pad: bool | None = None) -> GenerateBatch:
    """Built once per configuration: CUDA graphs are captured here, not per run."""
    max_len = args.prompt_len + args.input_len + args.new_tokens
    start = time.monotonic()
    threads = cpu_threads.resolve(getattr(args, "threads", None) or 0)
    # as the server builds it (server/build.py), with the model's thread count
    batch = make_batch(loaded, "continuous", max_running=args.max_running, max_seq_len=max_len, prefix_cache_size=64,
                       cuda_graphs=graphs, compile=compile, pad_steps=pad, threads=threads)  # fmt: skip
    d = batch.backend.decode_step
    print(
        f"engine built in {time.monotonic() - start:.1f} s: graphs={d.use_graphs} ({len(d.graphs)} captured) "
        f"compile={compile} pad={d.pad}",
        flush=True,
    )
    return batch


def scheduler_for(batch: GenerateBatch, args, stats: BatchStats) -> Scheduler:
    """The real scheduler over `batch`, with an empty prefix cache, on
    --threads CPU threads as the server's is (ptcore/cpu_threads.py)."""
    batch.backend.prefixes.clear()
    threads = cpu_threads.resolve(getattr(args, "threads", None) or 0)
    return Scheduler(batch, Classifier(batch.backend.loaded), args.max_running, args.max_wait_ms / 1000, stats,
                     threads=threads)  # fmt: skip


@dataclass
class TimedSink(Collected):
    """The scheduler's records, and when each request's last one was handed over."""

    finished_at: dict[int, float] = field(default_factory=dict)

    def put(self, outputs) -> None:
        now = time.monotonic()
        self.finished_at.update((o.request_id, now) for o in outputs if o.finished)
        super().put(outputs)


def run_engine(batch, requests, args, arrivals=None, concurrent=True) -> dict:
    """Through the real scheduler thread: all at once, one at a time, or at
    `arrivals` offsets. Every run starts with an empty prefix cache."""
    stats = BatchStats()
    scheduler = scheduler_for(batch, args, stats)
    sink = TimedSink()
    scheduler.start(sink)
    works = []
    start = time.monotonic()
    try:
        for i, (prompt, ids, params) in enumerate(requests):
            if arrivals is not None:
                time.sleep(max(0.0, start + arrivals[i] - time.monotonic()))
            w = Request.generate(prompt, ids, params)
            works.append(w)
            scheduler.submit(w)
            if not concurrent:
                sink.answer(w.id)
        for w in works:
            sink.answer(w.id)
        wall = time.monotonic() - start
    finally:
        scheduler.stop()
    n = args.new_tokens
    ttft = [w.first_token_at - w.submitted_at for w in works]
    tpot = [(sink.finished_at[w.id] - w.first_token_at) / max(1, n - 1) for w in works]
    batches = stats.snapshot()["recent"]
    decode = [b for b in batches if b["kind"] == "decode"]
    full = [b["seconds"] for b in decode if b["size"] == args.max_running] or [b["seconds"] for b in decode]
    step_ms = 1000 * statistics.median(full) if full else None  # steps with every slot running, where there are any
    prefill = [b["seconds"] for b in batches if b["kind"] == "prefill"]
    prefill_ms = 1000 * statistics.median(prefill) if prefill else None  # the part of TTFT that is model work
    return summarize("", wall, n * len(works), ttft, tpot, step_ms, prefill_ms)


def admit(batch: GenerateBatch, requests, fresh_prefixes: bool) -> None:
    """Empty `batch`, then prefill `requests` into it as one admission; with
    fresh_prefixes, from an empty prefix cache (every prefix computed)."""
    batch.remove(list(batch.requests))
    if fresh_prefixes:
        batch.backend.prefixes.clear()
    batch.prefill([Request.generate(p, ids, params) for p, ids, params in requests])


def with_cudnn_attention(run):
    """run() with cuDNN attention allowed, as PyTorch has it unless told otherwise."""
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        return run()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(False)


def tokens_in_order(batch, requests) -> list[list[int]]:
    """Each request's tokens, the scheduler's loop run on this thread: admitted in
    order as slots free up, so two batches see the same batches."""
    scheduler = scheduler_for(batch, args=SimpleNamespace(max_running=len(requests), max_wait_ms=0), stats=BatchStats())
    results = scheduler.run_to_completion([Request.generate(prompt, ids, params) for prompt, ids, params in requests])
    return [r.token_ids for r in results]


class StepClock:
    """A logits processor that only notes the time of every generation step."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.monotonic())
        return scores


def hf_generate(loaded, batch, new: int) -> tuple[float, list[float], list[list[int]]]:
    """HF generate on one left-padded batch with inputs_embeds; -> (start, step times, new tokens per row)."""
    table, offsets = prompt_table([p.rows for p, _, _ in batch])
    ids, mask, _ = pack([i for _, i, _ in batch], offsets, loaded.vocab_size, loaded.device)
    embeds = embed(loaded.model.get_input_embeddings(), ids, table, loaded.vocab_size)
    clock = StepClock()
    start = time.monotonic()
    with torch.inference_mode():
        out = loaded.model.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
            logits_processor=LogitsProcessorList([clock]), pad_token_id=0,
        )  # fmt: skip
    sync(loaded)
    clock.times.append(time.monotonic())  # the last step's token is chosen after the last call
    return start, clock.times, out.tolist()  # with inputs_embeds, generate returns only the new tokens


def run_hf(loaded, requests, args, per_task: bool) -> dict:
    groups = {}
    for r in requests:
        groups.setdefault(r[0].task_id if per_task else "all", []).append(r)
    start = time.monotonic()
    ttft, tpot = [], []
    for batch in groups.values():
        _, times, _ = hf_generate(loaded, batch, args.new_tokens)
        first = times[1] if len(times) > 1 else times[0]  # stamp after the first chosen token
        ttft += [first - start] * len(batch)
        tpot += [(times[-1] - first) / max(1, args.new_tokens - 1)] * len(batch)
    wall = time.monotonic() - start
    return summarize("", wall, args.new_tokens * len(requests), ttft, tpot)


def run_rounds(plan, repeats: int) -> list[dict]:
    """Each mode `repeats` times, interleaved, the order rotated each round so
    that drift hits all alike; the run with the median throughput stands for
    its mode. Each mode's row is printed as a RESULT line as soon as it is known."""
    runs: dict[str, list[dict]] = {name: [] for _, name, _ in plan}
    for r in range(repeats):
        for _, name, fn in plan[r % len(plan) :] + plan[: r % len(plan)]:
            row = fn()
            row["mode"] = name
            runs[name].append(row)
            print(f"round {r + 1}: {name}: {row['tokens_per_s']:.1f} tok/s", flush=True)
    rows = []
    for rs in runs.values():
        rs = sorted(rs, key=lambda x: x["tokens_per_s"])
        rows.append({**rs[len(rs) // 2], "all": [x["tokens_per_s"] for x in rs]})
        print("RESULT " + json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="gpt2-small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=20, help="pseudo tokens per task")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=32, help="requests in the closed batch")
    ap.add_argument("--max-running", type=int, default=None, help="engine slots (default: --concurrency)")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--rate", type=float, default=None, help="also run Poisson arrivals at this many requests/s")
    ap.add_argument("--modes", default="abcdefgh",
                    help="which of a..h to run (f: on CUDA with graphs; g: --compile; h: on CUDA)")  # fmt: skip
    ap.add_argument("--no-graphs", dest="graphs", action="store_false", help="no CUDA graphs for the engine")
    ap.add_argument("--compile", action="store_true", help="also (g): the engine with a torch.compile'd step")
    ap.add_argument("--serial", type=int, default=None, help="(e): only the first N requests (default: all)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of all modes; the median round is reported")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--write", action="store_true", help="write the table to bench/results/")
    args = ap.parse_args()
    args.max_running = args.max_running or args.concurrency
    threads = cpu_threads.resolve(args.threads or 0)
    cpu_threads.serial()  # before anything computes: the scheduler and HF (cpu_threads.on_thread) get the threads
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    loaded = build(args.shape, args.device, dtype)
    mixed = make_requests(loaded, args.tasks, args.concurrency, args.prompt_len, args.input_len, args.new_tokens)
    single = make_requests(loaded, 1, args.concurrency, args.prompt_len, args.input_len, args.new_tokens)

    engine = make_batcher(loaded, args, graphs=args.graphs)
    run_engine(engine, mixed, args)  # warm-up at full size: the first timed mode must not pay for page faults
    serial = mixed[: args.serial] if args.serial else mixed
    hf = lambda per_task: cpu_threads.on_thread(threads, lambda: run_hf(loaded, mixed, args, per_task))  # noqa: E731
    plan = [
        ("a", "(a) ptserve engine, mixed tasks", lambda: run_engine(engine, mixed, args)),
        ("b", "(b) ptserve engine, one task", lambda: run_engine(engine, single, args)),
        ("c", "(c) HF generate, one mixed batch", lambda: hf(False)),
        ("d", "(d) HF generate, one task per pass", lambda: hf(True)),
        ("e", "(e) ptserve engine, one at a time", lambda: run_engine(engine, serial, args, concurrent=False)),
    ]
    notes = []
    if engine.backend.decode_step.use_graphs:
        # the same step without graphs, timed beside; and a check that replaying
        # graphs gives the tokens of the eager step at the same (padded) shapes
        eager = make_batcher(loaded, args, graphs=False)
        run_engine(eager, mixed, args)
        plan.append(("f", "(f) ptserve engine, mixed, no CUDA graphs", lambda: run_engine(eager, mixed, args)))
        replayed = tokens_in_order(engine, mixed)
        same_shapes = tokens_in_order(make_batcher(loaded, args, graphs=False, pad=True), mixed)  # dropped after
        exact = tokens_in_order(eager, mixed)
        notes += [f"CUDA graphs vs eager step at the same shapes: {agreement(replayed, same_shapes)}",
                  f"CUDA graphs vs eager step at exact shapes: {agreement(replayed, exact)}"]  # fmt: skip
    if loaded.device.type == "cuda":
        plan.append(("h", "(h) ptserve engine, mixed, cuDNN attention allowed", lambda: with_cudnn_attention(
            lambda: run_engine(engine, mixed, args))))  # fmt: skip
    plan = [p for p in plan if p[0] in args.modes]
    rows = run_rounds(plan, args.repeats)
    if args.rate:
        rng = random.Random(1)
        t, arrivals = 0.0, []
        for _ in mixed:
            arrivals.append(t)
            t += rng.expovariate(args.rate)
        row = run_engine(engine, mixed, args, arrivals=arrivals)
        row["mode"] = f"(p) ptserve engine, Poisson {args.rate}/s"
        print("RESULT " + json.dumps(row), flush=True)
        rows.append(row)
    if args.compile and "g" in args.modes:  # last: its compilation is the slowest part of the run
        fused = make_batcher(loaded, args, graphs=args.graphs, compile=True)
        run_engine(fused, mixed, args)
        rows += run_rounds([("g", "(g) ptserve engine, mixed, torch.compile", lambda: run_engine(fused, mixed, args))],
                           args.repeats)  # fmt: skip

    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores, {threads} threads)"
    )  # noqa: E501
    lines = [
        f"# engine benchmark, {date.today()}, {platform.node()}, {device}",
        f"shape={args.shape} dtype={str(dtype).replace('torch.', '')} tasks={args.tasks} prompt_len={args.prompt_len} "
        f"input_len={args.input_len} new_tokens={args.new_tokens} concurrency={args.concurrency} "
        f"max_running={args.max_running} repeats={args.repeats} serial={len(serial)} "
        f"cuda_graphs={engine.backend.decode_step.use_graphs} "
        f"torch={torch.__version__} transformers={transformers.__version__}",
        "decode step ms: median over steps with all max_running slots busy (all steps where none were); "
        "prefill ms: median over the run's prefill batches (admission, forward and first tokens)",
        "",
        "| mode | tokens/s (median) | all runs | wall s | TTFT p50 ms | TTFT p99 ms | per-token p50 ms "
        "| per-token p99 ms | decode step ms | prefill ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = f"{r['step_ms']:.2f}" if r.get("step_ms") else "-"
        prefill = f"{r['prefill_ms']:.1f}" if r.get("prefill_ms") else "-"
        lines.append(
            f"| {r['mode']} | {r['tokens_per_s']:.1f} | {' '.join(f'{x:.0f}' for x in r.get('all', []))} | "
            f"{r['wall_s']:.2f} | {r['ttft_p50_ms']:.0f} | "
            f"{r['ttft_p99_ms']:.0f} | {r['tpot_p50_ms']:.1f} | {r['tpot_p99_ms']:.1f} | {step} | {prefill} |"
        )
    by = {r["mode"][:3]: r["tokens_per_s"] for r in rows}
    lines.append("")
    pairs = [("(a)", x) for x in ("(e)", "(c)", "(b)", "(d)", "(f)", "(h)")] + [("(g)", "(a)")]
    for a, b in pairs:
        if a in by and b in by:
            lines.append(f"{a}/{b} = {by[a] / by[b]:.2f}x")
    lines += [""] + notes if notes else []
    for note in notes:
        print("RESULT " + json.dumps({"note": note}), flush=True)
    report(lines, f"engine-{args.shape}", args.write)


if __name__ == "__main__":
    main()
