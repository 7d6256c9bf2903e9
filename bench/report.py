"""Printing a benchmark's table and keeping it under bench/results/."""

from __future__ import annotations

import platform
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def report(lines: list[str], name: str, write: bool) -> None:
    """Print `lines`; with `write`, also save them as results/<date>-<machine>-<name>.md."""
    print("\n".join(lines))
    if write:
        out = RESULTS / f"{date.today()}-{platform.node()}-{name}.md"
        out.parent.mkdir(exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")
