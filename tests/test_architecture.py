"""ARCHITECTURE.md's list of the stages of a generate request stays true: every
stage names a function that exists in the file it names, and there are at most
15 of them."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = re.compile(r"^\s*(\d+)\. `([\w.]+)` — `([\w/]+\.py)`", re.M)
NAMED = re.compile(r"`([A-Za-z_]\w*(?:\.\w+)?)`,?\s*\(?`([\w/]+\.py)`")  # `Name` (`file.py`


def stages() -> list[tuple[int, str, str]]:
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    return [(int(n), name, path) for n, name, path in STAGE.findall(text)]


def defined_in(path: Path) -> set[str]:
    """Top-level functions and classes, and Class.method, of one file."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            names.update(f"{node.name}.{item.name}" for item in node.body
                         if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)))  # fmt: skip
    return names


def test_the_stages_are_numbered_in_order_and_at_most_15():
    numbers = [n for n, _, _ in stages()]
    assert numbers == list(range(1, len(numbers) + 1))
    assert 10 <= len(numbers) <= 15


def test_every_stage_names_a_function_of_its_file():
    missing = [f"{n}. {name} in {path}" for n, name, path in stages()
               if not (ROOT / path).is_file() or name not in defined_in(ROOT / path)]  # fmt: skip
    assert missing == []


def test_every_function_named_beside_its_file_is_there():
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    pairs = NAMED.findall(text)
    assert len(pairs) >= 10  # the page names this many, at least: the pattern still reads it
    missing = [f"{name} in {path}" for name, path in pairs
               if not (ROOT / path).is_file() or name not in defined_in(ROOT / path)]  # fmt: skip
    assert missing == []


def test_every_file_the_page_names_exists():
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    files = set(re.findall(r"`((?:server|ptcore|prompt_store|ptuning|ptclient|tests)/[\w/]+\.py)`", text))
    assert files and [f for f in sorted(files) if not (ROOT / f).is_file()] == []
