"""The example tasks (examples/) on their held-out test splits: the manual
prompt a person would write, against the P-tuned prompt in examples/prompts/,
on the default model (SmolLM2-135M-Instruct), float32, greedy.

- sentiment (classify): accuracy. The manual prompt scores each verbalizer's
  summed log-probability after the text, as the server scores labels.
- language (LAMA-style, generate): P@1, the first generated token is the
  answer's first token.
- dates (generate): exact match of the generated text, cut at the first
  newline or period, with the expected output.

The manual prompt runs through Hugging Face directly, on its text; the
P-tuned prompt runs through the serving path (the engine's scheduler). Nothing here is
tuned on the test splits.

    python -m bench.example_tasks [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch

from bench.report import report
from prompt_store.artifact import read_artifact
from prompt_store.template import render
from ptcore.model import load_model
from ptcore.task_prompt import task_prompt
from server.engine.backends import make_batch
from server.engine.classify import Classifier
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.stats import BatchStats

ROOT = Path(__file__).resolve().parent.parent

EXAMPLES = ROOT / "examples"
TASKS = {  # task -> (manual template, kind, new tokens)
    "sentiment": ("Review: {input} Sentiment:", "classify", 0),
    "language": ("The official language of {input} is", "generate", 3),
    "dates": ("Sentence: {input} Date:", "generate", 6),
}
LABELS = {"positive": " positive", "negative": " negative"}


def rows(task: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLES / task / f"{split}.jsonl").read_text().splitlines() if line.strip()]


def answer(text: str) -> str:
    """The generated answer: up to the first newline or period."""
    return text.split("\n")[0].split(".")[0].strip()


def correct(task: str, tokenizer, row: dict, token_ids: list[int], text: str) -> bool:
    if task == "language":
        expected = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        return token_ids[:1] == expected[:1]
    return answer(text) == row["output"].strip()


@torch.inference_mode()
def manual(loaded, task: str, template: str, kind: str, new: int, data: list[dict]) -> float:
    tok, model = loaded.tokenizer, loaded.model
    hits = 0
    for row in data:
        prompt = tok(template.format(input=row["input"]), add_special_tokens=False)["input_ids"]
        if kind == "classify":
            scores = {}
            for label, verbalizer in LABELS.items():
                v = tok(verbalizer, add_special_tokens=False)["input_ids"]
                logp = model(torch.tensor([prompt + v])).logits[0].log_softmax(-1)
                scores[label] = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(v))
            hits += max(scores, key=scores.get) == row["label"]
        else:
            out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                                 pad_token_id=tok.eos_token_id)[0, len(prompt) :].tolist()  # fmt: skip
            hits += correct(task, tok, row, out, tok.decode(out, skip_special_tokens=True))
    return hits / len(data)


def ptuned(loaded, path: Path, task: str, kind: str, new: int, data: list[dict]) -> tuple[float, str]:
    artifact = read_artifact(path.read_bytes())
    return score(loaded, artifact, task, kind, new, data), artifact.meta["template"]


def score(loaded, artifact, task: str, kind: str, new: int, data: list[dict]) -> float:
    """A trained prompt's figure on `data`, through the serving path."""
    prompt = task_prompt(task, 1, artifact, loaded)
    runner = Scheduler(make_batch(loaded), Classifier(loaded), 64, 0.0, BatchStats())
    ids = [render(prompt.template, loaded.tokenizer, {"input": r["input"]}, loaded.vocab_size) for r in data]
    if kind == "classify":
        results = runner.run_to_completion([Request.classify(prompt, i) for i in ids])
        hits = sum(r.label == row["label"] for r, row in zip(results, data))
    else:
        results = runner.run_to_completion([Request.generate(prompt, i, SamplingParams(new)) for i in ids])
        hits = sum(correct(task, loaded.tokenizer, row, r.token_ids, r.text) for r, row in zip(results, data))
    return hits / len(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="write the table to bench/results/")
    ap.add_argument("--split", choices=["test", "dev"], default="test", help="dev: to choose between prompts")
    ap.add_argument("--prompts", default=str(EXAMPLES / "prompts"), help="folder of TASK.safetensors")
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    args = ap.parse_args()
    loaded = load_model(None, device="cpu", dtype="float32")  # the default model
    lines = [
        f"# example tasks, {date.today()}, {platform.node()} ({platform.machine()}, CPU, {os.cpu_count()} cores)",
        f"model: {loaded.info['name_or_path']} (the default), float32, greedy; the {args.split} splits; "
        f"P-tuned prompts from {args.prompts}",
        "",
        "| task | metric | test size | manual prompt | P-tuned (examples/prompts) | P-tuned template | s |",
        "|---|---|---|---|---|---|---|",
    ]
    metric = {"sentiment": "accuracy", "language": "P@1", "dates": "exact match"}
    for task in args.tasks:
        template, kind, new = TASKS[task]
        data = rows(task, args.split)
        start = time.monotonic()
        m = manual(loaded, task, template, kind, new, data)
        p, ptemplate = ptuned(loaded, Path(args.prompts) / f"{task}.safetensors", task, kind, new, data)
        lines.append(f"| {task} | {metric[task]} | {len(data)} | {m:.3f} (`{template}`) | {p:.3f} | "
                     f"`{ptemplate}` | {time.monotonic() - start:.0f} |")  # fmt: skip
        print(lines[-1], flush=True)
    report(lines, f"example-tasks-{args.split}", args.write)


if __name__ == "__main__":
    main()
