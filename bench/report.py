"""Printing a benchmark's table and keeping it under bench/results/."""

from __future__ import annotations

import platform
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent


def without_machine_paths(text: str) -> str:
    """Paths in the checkout written relative to it, and the home folder as ~:
    what is committed shows no folder of the machine that made it."""
    return text.replace(f"{ROOT}/", "").replace(str(ROOT), ".").replace(str(Path.home()), "~")


def report(lines: list[str], name: str, write: bool) -> None:
    """Print `lines`; with `write`, also save them as results/<date>-<machine>-<name>.md."""
    print("\n".join(lines))
    if write:
        out = RESULTS / f"{date.today()}-{platform.node()}-{name}.md"
        out.parent.mkdir(exist_ok=True)
        out.write_text(without_machine_paths("\n".join(lines) + "\n"))
        print(f"wrote {out}")
