"""Training data: JSONL, one example per line.

Each line is an object with the template's fields plus `label` (classify) or
`output` (generate); for a template whose one field is `input`, OpenAI's
`prompt` and `completion` stand for them. A line that does not fit is an error
naming its number.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prompt_store.template import Template
from ptcore.errors import InvalidRequest


class DataError(InvalidRequest):
    pass


@dataclass(frozen=True)
class Example:
    fields: dict[str, str]
    target: str  # the label name (classify) or the output text (generate)
    line: int  # 1-based line number in its file


def load_examples(path: str | Path, template: Template, task_type: str, labels: dict[str, str] | None) -> list[Example]:
    with open(path, encoding="utf-8") as f:
        return parse_examples(f, str(path), template, task_type, labels)


def parse_examples(lines: Iterable[str], source: str, template: Template, task_type: str,
                   labels: dict[str, str] | None) -> list[Example]:  # fmt: skip
    """The examples of JSONL `lines`; errors name `source` and the line."""
    target_key = "label" if task_type == "classify" else "output"
    examples = []
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{source}, line {n}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object")
        if template.fields == ("input",) and "prompt" in obj and "input" not in obj:  # OpenAI's names
            obj = {"input": obj["prompt"], target_key: obj.get("completion", obj.get(target_key))}
        missing = [k for k in (*template.fields, target_key) if k not in obj]
        if missing:
            raise DataError(f"{where}: missing {missing} (template {template.source!r} needs {list(template.fields)})")
        values = {k: obj[k] for k in (*template.fields, target_key)}
        bad = [k for k, v in values.items() if not isinstance(v, str)]
        if bad:
            raise DataError(f"{where}: {bad} must be strings")
        if task_type == "classify" and values["label"] not in labels:
            raise DataError(f"{where}: unknown label {values['label']!r}; the labels are {list(labels)}")
        examples.append(Example({k: values[k] for k in template.fields}, values[target_key], n))
    if not examples:
        raise DataError(f"{source}: no examples")
    return examples


def split_dev(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle, then the last `fraction` of it is the dev set."""
    if not 0 < fraction < 1:
        raise DataError(f"--dev-fraction must be between 0 and 1, got {fraction}")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_dev = max(1, round(len(shuffled) * fraction))
    if n_dev >= len(shuffled):
        raise DataError(f"{len(examples)} examples are too few to hold out a dev set")
    return shuffled[:-n_dev], shuffled[-n_dev:]


def split_for_training(examples: list[Example], fraction: float, seed: int, min_dev_examples: int,
                       dev_decides: bool) -> tuple[list[Example], list[Example], bool]:  # fmt: skip
    """The train and dev sets when no dev file is given: `fraction` held out by
    split_dev. A split smaller than `min_dev_examples` cannot pick an epoch (the
    trainer keeps the last one); unless it still decides something (`dev_decides`:
    the manual prompt of --from-prompt must be beaten on it), it is trained on
    too rather than thrown away. -> (train, dev, whether dev is also in train)."""
    train, dev = split_dev(examples, fraction, seed)
    if len(dev) >= min_dev_examples or dev_decides:
        return train, dev, False
    return train + dev, dev, True
