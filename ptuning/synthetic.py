"""A synthetic classification task for smoke tests and for showing that the
trainer learns: the label is decided by one keyword hidden among filler words,
so it depends on the input and the best constant answer scores about 50%."""

from __future__ import annotations

import json
import random
from pathlib import Path

KEYWORDS = {
    "yes": ["json", "dict", "list", "parse", "encode", "decode"],
    "no": ["path", "file", "directory", "stat", "open", "write"],
}
FILLER = ["the", "a", "of", "to", "and", "is", "in", "for", "with"]
LABELS = {"yes": " yes", "no": " no"}  # label -> verbalizer (causal LM)


def keyword_examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(KEYWORDS))
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
        words.insert(rng.randint(0, len(words)), rng.choice(KEYWORDS[label]))
        rows.append({"input": " ".join(words), "label": label})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)
