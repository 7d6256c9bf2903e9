"""The CPU yardstick: ptserve against llama.cpp and Hugging Face `generate` on
the default model (SmolLM2-135M, float32), side by side in one run.

The workload: --sequences prompts of about --prompt-tokens tokens, each
generating exactly --new-tokens greedy tokens (past end-of-sequence). For
ptserve and HF, --soft of those tokens are a task's soft prompt (template
`[P:soft/2]{input}[P:soft/2]`, --tasks tasks); llama.cpp, which has no soft
prompts, gets as many real tokens in their place. Inputs are the example
tasks' test sentences.

  ptserve    a real `ptserve serve` subprocess on a loopback port, through HTTP
  hf         `generate` with inputs_embeds on one left-padded batch, in this process
  llama.cpp  the default model's GGUF made float32, every sequence in one
             llama_batch (only when llama-cpp-python is installed)

Each system runs concurrently (all sequences at once) and one at a time (the
first --serial sequences), every round, in turns. The median round is
reported, with the machine's float32 matrix-multiply peak beside it.

llama.cpp is the yardstick, not a dependency. To install it (compiles for
about 8 minutes on 2 cores; GGML_NATIVE builds for this CPU):

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python
    python -m bench.cpu_anchor                 # about 3 minutes per round on 2 cores
    python -m bench.cpu_anchor --write         # also writes bench/results/
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx
import torch

from bench.engine import agreement, hf_generate
from bench.report import report
from bench.serve_process import start_server
from prompt_store.artifact import artifact_bytes, make_artifact
from ptcore.model import load_model
from ptcore.model_source import DEFAULT_MODEL_CACHE, ModelCache, default_gguf, resolve_model
from ptcore.task_prompt import task_prompt
from server.engine.request import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["sentiment", "language", "dates"]


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """float32 GFLOP/s of an n x n matrix product on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def sentences(n: int, tokenizer, length: int) -> list[tuple[str, list[int]]]:
    """n example sentences, each cut or extended (with the next sentence) to
    exactly `length` tokens: (text, token ids) where the text tokenizes to those ids."""
    texts = [json.loads(line)["input"] for name in EXAMPLES
             for line in (ROOT / "examples" / name / "test.jsonl").read_text().splitlines()]  # fmt: skip
    out, i = [], 0
    while len(out) < n:
        ids: list[int] = []
        while len(ids) < length:
            ids += tokenizer(texts[i % len(texts)] + " ", add_special_tokens=False)["input_ids"]
            i += 1
        text = tokenizer.decode(ids[:length])
        again = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(again) == length:  # a cut that re-tokenizes the same way
            out.append((text, again))
    return out


class Workload:
    """The sequences, each system's view of them, and the tasks' soft prompts."""

    def __init__(self, loaded, args):
        self.args = args
        self.loaded = loaded
        self.half = args.soft // 2
        self.inputs = sentences(args.sequences, loaded.tokenizer, args.prompt_tokens - 2 * self.half)
        weight = loaded.model.get_input_embeddings().weight
        g = torch.Generator().manual_seed(0)
        template = f"[P:{self.half}]{{input}}[P:{self.half}]"
        self.artifacts = [
            make_artifact(rows, template=template, task_type="generate", base_model=loaded.info)
            for rows in torch.randn(args.tasks, 2 * self.half, weight.shape[1], generator=g) * float(weight.std())
        ]
        self.prompts = [task_prompt(f"task{t}", 1, a, loaded) for t, a in enumerate(self.artifacts)]
        filler = loaded.tokenizer("Answer the question below in one short sentence, please, thank you.",
                                  add_special_tokens=False)["input_ids"]  # fmt: skip
        self.filler = (filler * (1 + 2 * self.half // len(filler)))[: 2 * self.half]

    def task_of(self, i: int) -> int:
        return i % self.args.tasks

    def hf_batch(self, indices) -> list:
        """bench.engine's (prompt, ids, params) for sequences `indices`."""
        V, h = self.loaded.vocab_size, self.half
        pseudo = list(range(V, V + 2 * h))
        new = SamplingParams(max_new_tokens=self.args.new_tokens)
        return [(self.prompts[self.task_of(i)], pseudo[:h] + self.inputs[i][1] + pseudo[h:], new) for i in indices]

    def token_prompts(self, indices) -> list[list[int]]:
        """llama.cpp's prompts: the soft positions hold real tokens."""
        h = self.half
        return [self.filler[:h] + self.inputs[i][1] + self.filler[h:] for i in indices]


# ---- the systems: each run_* takes sequence indices and returns (wall seconds, tokens per sequence)


def in_turns(generate, indices, concurrent: bool):
    """generate(indices) for all at once, or for each one alone; -> (wall seconds, tokens per sequence)."""
    groups = [indices] if concurrent else [[i] for i in indices]
    start = time.perf_counter()
    tokens = []
    for group in groups:
        tokens += generate(group)
    return time.perf_counter() - start, tokens


def hf_tokens(work: Workload, indices) -> list[list[int]]:
    return hf_generate(work.loaded, work.hf_batch(indices), work.args.new_tokens)[2]


class Served:
    """A `ptserve serve` subprocess with the workload's tasks uploaded."""

    def __init__(self, model: str, store: str, work: Workload, log):
        self.work = work
        self.proc, self.url = start_server(model, store, "--max-wait-ms", "5", log=log)
        for t, artifact in enumerate(work.artifacts):
            httpx.put(f"{self.url}/v1/tasks/task{t}", content=artifact_bytes(artifact), timeout=60).raise_for_status()

    def run(self, indices, concurrent: bool):
        return asyncio.run(self._send(indices, concurrent))

    async def _send(self, indices, concurrent: bool):
        work = self.work

        async def one(client, i):
            body = {"input": work.inputs[i][0], "max_new_tokens": work.args.new_tokens, "ignore_eos": True}
            r = await client.post(f"/v1/tasks/task{work.task_of(i)}/generate", json=body)
            if r.status_code != 200:
                raise SystemExit(f"ptserve answered {r.status_code}: {r.text}")
            return r.json()["token_ids"]

        async with httpx.AsyncClient(base_url=self.url, timeout=600) as client:
            start = time.perf_counter()
            if concurrent:
                tokens = await asyncio.gather(*(one(client, i) for i in indices))
            else:
                tokens = [await one(client, i) for i in indices]
            return time.perf_counter() - start, list(tokens)

    def close(self):
        self.proc.terminate()
        self.proc.wait()


class LlamaCpp:
    """llama.cpp through llama-cpp-python's C API: greedy decoding of many
    sequences in one llama_batch per step."""

    def __init__(self, gguf: Path, threads: int, sequences: int, max_len: int, batch_tokens: int):
        import llama_cpp as ll

        self.ll = ll
        self.model = ll.llama_model_load_from_file(str(gguf).encode(), ll.llama_model_default_params())
        p = ll.llama_context_default_params()
        p.n_ctx = sequences * max_len
        p.n_batch = max(batch_tokens, 512)
        p.n_seq_max = sequences
        p.n_threads = p.n_threads_batch = threads
        p.kv_unified = True  # one cache shared by the sequences, as n_ctx counts it
        self.ctx = ll.llama_init_from_model(self.model, p)
        self.vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        self.batch = ll.llama_batch_init(p.n_batch, 0, sequences)

    def _decode(self, entries) -> list[int]:
        """entries: (token, position, sequence, wants logits); -> the argmax of each wanted position."""
        ll, b = self.ll, self.batch
        wanted = []
        for i, (token, pos, seq, want) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = token, pos, 1, seq, want
            if want:
                wanted.append(i)
        b.n_tokens = len(entries)
        if ll.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        import numpy as np

        return [int(np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,)).argmax())
                for i in wanted]  # fmt: skip

    def generate(self, prompts: list[list[int]], new: int) -> list[list[int]]:
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)
        entries = [(t, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
        last = self._decode(entries)
        out = [[t] for t in last]
        for step in range(new - 1):
            last = self._decode([(t, len(p) + step, s, True) for s, (t, p) in enumerate(zip(last, prompts))])
            for o, t in zip(out, last):
                o.append(t)
        return out

    def run(self, work: Workload, indices, concurrent: bool):
        return in_turns(lambda group: self.generate(work.token_prompts(group), work.args.new_tokens), indices,
                        concurrent)  # fmt: skip


def quiet_llama_cpp():
    """No log lines from llama.cpp (it prints every tensor it loads or converts).
    -> the callback, which the caller keeps alive as long as llama.cpp runs."""
    import llama_cpp as ll

    callback = ll.llama_log_callback(lambda level, text, data: None)
    ll.llama_log_set(callback, None)
    ll.llama_backend_init()
    return callback


def float32_gguf(cache_root: str, dest: Path) -> Path:
    """The default model's GGUF (Q4_1, as packaged) requantized to all-float32."""
    import ctypes

    import llama_cpp as ll

    if not dest.exists():
        params = ll.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = 0, True  # 0: LLAMA_FTYPE_ALL_F32
        tmp = dest.with_suffix(".part")
        if ll.llama_model_quantize(str(default_gguf(ModelCache(cache_root))).encode(), str(tmp).encode(),
                                   ctypes.byref(params)) != 0:  # fmt: skip
            raise SystemExit("llama_model_quantize failed")
        os.replace(tmp, dest)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=40, help="per sequence, soft tokens included")
    ap.add_argument("--soft", type=int, default=20, help="soft tokens per task (half before the input, half after)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--serial", type=int, default=4, help="sequences run one at a time")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="HF's and llama.cpp's threads")
    ap.add_argument("--systems", default="ptserve,hf,llama.cpp")
    ap.add_argument("--model-cache", default=os.environ.get("PTSERVE_MODEL_CACHE", DEFAULT_MODEL_CACHE))
    ap.add_argument("--server-log", help="write the server's log here")
    ap.add_argument("--write", action="store_true", help="write the table to bench/results/")
    args = ap.parse_args()
    systems = args.systems.split(",")
    torch.set_num_threads(args.threads)
    model = resolve_model(None, args.model_cache)
    loaded = load_model(model, device="cpu", dtype="float32")
    for cfg in (loaded.model.config, loaded.model.generation_config):
        cfg.eos_token_id = None  # HF: every sequence generates exactly --new-tokens
    work = Workload(loaded, args)
    everything, serial = list(range(args.sequences)), list(range(args.serial))
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        log = open(args.server_log, "w") if args.server_log else None
        if "ptserve" in systems:
            served = Served(model, str(Path(tmp) / "store"), work, log)
            runners["ptserve"] = served.run
        if "hf" in systems:
            runners["hf"] = lambda ix, c: in_turns(lambda group: hf_tokens(work, group), ix, c)
        if "llama.cpp" in systems:
            try:
                quiet = quiet_llama_cpp()  # noqa: F841 (kept alive while llama.cpp runs)
                gguf = float32_gguf(args.model_cache, Path(args.model_cache).expanduser() / "SmolLM2-135M-f32.gguf")
                llama = LlamaCpp(gguf, args.threads, args.sequences, args.prompt_tokens + args.new_tokens,
                                 args.sequences * args.prompt_tokens)  # fmt: skip
                runners["llama.cpp"] = lambda ix, c: llama.run(work, ix, c)
            except ImportError:
                print("llama-cpp-python is not installed: no llama.cpp row (see --help)", flush=True)
        try:
            for run in runners.values():  # warm-up: first calls allocate and compile
                run(serial[:2], True)
            peak, walls, tokens = [], {}, {}
            for r in range(args.rounds):
                peak.append(matmul_peak())
                for name, run in runners.items():
                    for mode, ix in (("concurrent", everything), ("one at a time", serial)):
                        wall, toks = run(ix, mode == "concurrent")
                        if any(len(t) != args.new_tokens for t in toks):
                            raise SystemExit(f"{name} gave answers of {sorted({len(t) for t in toks})} tokens")
                        walls.setdefault((name, mode), []).append(wall)
                        tokens[(name, mode)] = toks
                        rate = len(ix) * args.new_tokens / wall
                        print(f"round {r + 1}: {name}, {mode}: {rate:.1f} tokens/s", flush=True)
        finally:
            if "ptserve" in runners:
                served.close()
    write_table(args, loaded, work, walls, tokens, peak)


def write_table(args, loaded, work, walls, tokens, peak) -> None:
    rate = {k: [n * args.new_tokens / w for w in ws] for k, ws in walls.items()
            for n in [args.sequences if k[1] == "concurrent" else args.serial]}  # fmt: skip
    median = {k: statistics.median(v) for k, v in rate.items()}
    names = list(dict.fromkeys(name for name, _ in walls))
    lines = [
        f"# CPU anchor, {date.today()}, {platform.node()} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {args.threads} threads), torch {torch.__version__}",
        f"default model float32; {args.sequences} sequences of {args.prompt_tokens} prompt tokens "
        f"({args.soft} soft for ptserve and HF, over {args.tasks} tasks), {args.new_tokens} new tokens each, "
        f"greedy; one at a time: the first {args.serial}; {args.rounds} rounds, median shown",
        f"float32 matmul peak (2048^2): {statistics.median(peak):.0f} GFLOP/s",
        "",
        f"| system | {args.sequences} concurrent, tokens/s (all rounds) | one at a time, tokens/s (all rounds) |",
        "|---|---|---|",
    ]
    for name in names:
        cells = [f"**{median[(name, m)]:.1f}** ({' / '.join(f'{x:.1f}' for x in rate[(name, m)])})"
                 for m in ("concurrent", "one at a time")]  # fmt: skip
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    lines.append("")
    for base in ("llama.cpp", "hf"):
        if "ptserve" in names and base in names:
            c = median[("ptserve", "concurrent")] / median[(base, "concurrent")]
            s = median[("ptserve", "one at a time")] / median[(base, "one at a time")]
            lines.append(f"ptserve / {base}: {c:.2f}x concurrent, {s:.2f}x one at a time")
    if "ptserve" in names and "hf" in names:
        lines.append("ptserve and HF greedy tokens: " + agreement(tokens[("ptserve", "concurrent")],
                                                                  tokens[("hf", "concurrent")]))  # fmt: skip
    report(lines, "cpu-anchor", args.write)


if __name__ == "__main__":
    main()
