"""The README's quick start, as CI runs it: read from README.md, never copied.

The README opens with three ```sh blocks, in this order:
  1. the install-and-serve command (one line);
  2. curl lines, each followed by a `# {...}` line: the answer the README shows;
  3. the test command (one line).

  python .ci/readme.py block N      prints block N (1-3) exactly as written
  python .ci/readme.py check-curls [URL]
                                    runs block 2's curls with bash, one by one, and
                                    checks each answer's "text" or "label" against
                                    the README's line under it; URL (for example
                                    http://127.0.0.1:8080) replaces the README's
                                    http://127.0.0.1:8000 in each command
  python .ci/readme.py tour         runs every later ```sh block (the short tour),
                                    each with bash -eu, in order, from the
                                    repository root, against the quick start's
                                    server; a block that runs docker-compose is
                                    left to scripts/compose-smoke.sh, which brings
                                    the compose file up for real

Only the standard library: it runs in any virtual environment, or none.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
README_URL = "http://127.0.0.1:8000"  # where the README's curls send their requests
CHECKED_FIELDS = ("text", "label")  # what the README's answers must match exactly; scores are shown shortened


def sh_blocks(text: str) -> list[str]:
    """The contents of the ```sh blocks, in order."""
    return [m.group(1) for m in re.finditer(r"^```sh\n(.*?)^```$", text, flags=re.M | re.S)]


def quick_start(text: str) -> list[str]:
    blocks = sh_blocks(text)
    if len(blocks) < 3:
        raise SystemExit(f"README.md: expected the quick start's three ```sh blocks, found {len(blocks)}")
    return blocks[:3]


def curls_and_answers(block: str) -> list[tuple[str, dict[str, str]]]:
    """(command, expected fields) for each curl: a command is its line plus the
    lines it continues onto (`\\` at the end); the `# {...}` line after it holds
    the answer, of which CHECKED_FIELDS are taken."""
    pairs: list[tuple[str, dict[str, str]]] = []
    command: list[str] = []
    for line in block.splitlines():
        if line.startswith("# {"):
            if not command:
                raise SystemExit(f"README.md: an answer line with no curl before it: {line}")
            expected = {k: v for k, v in re.findall(r'"(\w+)":"((?:[^"\\]|\\.)*)"', line) if k in CHECKED_FIELDS}
            if not expected:
                raise SystemExit(f"README.md: the answer line shows none of {CHECKED_FIELDS}: {line}")
            pairs.append(("\n".join(command), {k: json.loads(f'"{v}"') for k, v in expected.items()}))
            command = []
        elif line.strip():
            command.append(line)
    if command or not pairs:
        raise SystemExit("README.md: every curl in the second block needs a `# {...}` answer line under it")
    return pairs


def check_curls(block: str, url: str = README_URL) -> int:
    failures = 0
    for command, expected in curls_and_answers(block):
        if README_URL not in command:
            raise SystemExit(f"README.md: a quick-start curl that does not call {README_URL}: {command}")
        command = command.replace(README_URL, url)
        print(f"$ {command}", flush=True)
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
        print(done.stdout.rstrip() + done.stderr.rstrip(), flush=True)
        try:
            answer = json.loads(done.stdout)
        except ValueError:
            answer = {}
        got = {k: answer.get(k) for k in expected}
        if done.returncode != 0 or got != expected:
            print(f"FAIL: the README shows {expected}, the server answered {got} (exit {done.returncode})")
            failures += 1
        else:
            print(f"ok: {expected}")
    return 1 if failures else 0


def run_tour(blocks: list[str]) -> int:
    for block in blocks:
        print(f"$ {block.rstrip()}", flush=True)
        if "docker-compose" in block:
            print("(left to scripts/compose-smoke.sh, which runs the compose file)", flush=True)
            continue
        done = subprocess.run(["bash", "-eu", "-o", "pipefail", "-c", block], cwd=README.parent)
        if done.returncode != 0:
            print(f"FAIL: the README's block above exited {done.returncode}")
            return 1
    return 0


def main(argv: list[str]) -> int:
    text = README.read_text(encoding="utf-8")
    blocks = quick_start(text)
    if argv[:1] == ["block"] and len(argv) == 2 and argv[1] in ("1", "2", "3"):
        print(blocks[int(argv[1]) - 1], end="")
        return 0
    if argv[:1] == ["check-curls"] and len(argv) <= 2:
        return check_curls(blocks[1], *argv[1:])
    if argv == ["tour"]:
        return run_tour(sh_blocks(text)[3:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
