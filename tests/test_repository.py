"""What the repository itself promises: the README's quick start has the form CI
reads it in, and nothing committed shows a folder of the machine that made it or
cites a document that is not in the repository."""

import importlib.util
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


def ci_readme():
    spec = importlib.util.spec_from_file_location("ci_readme", ROOT / ".ci" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_opens_with_the_quick_start_ci_runs():
    readme = ci_readme()
    serve, curls, tests = readme.quick_start((ROOT / "README.md").read_text(encoding="utf-8"))
    assert serve == "pip install torch==2.13.0 -e . && ptserve serve --preload examples/prompts\n"
    assert tests.strip().endswith('pip install torch==2.13.0 -e ".[dev]" && python -m pytest')
    assert [expected for _, expected in readme.curls_and_answers(curls)] == [
        {"text": " November 14"},
        {"label": "negative"},
    ]


def test_the_quick_start_reader_refuses_a_curl_without_its_answer():
    readme = ci_readme()
    block = "curl -s http://127.0.0.1:8000/v1/tasks/x/generate \\\n  -d '{}'\n"
    try:
        readme.curls_and_answers(block)
    except SystemExit as e:
        assert "needs a `# {...}` answer line" in str(e)
    else:
        raise AssertionError("a curl with no answer line under it was accepted")


MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:root|home/\w+|work|tmp/pytest-of-\w+)/")


def test_committed_results_and_docs_show_no_machine_paths():
    files = tracked("bench/results", "README.md", "docs", "examples/*.md")
    assert files, "no files found: the test would check nothing"
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}"
        for path in files
        if path.suffix in (".md", ".log", ".json", ".txt")
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if MACHINE_PATH.search(line)
    ]
    assert found == []


def test_no_file_cites_a_document_that_is_not_in_the_repository():
    missing = []
    for path in tracked():
        if path.suffix not in (".py", ".md", ".sh", ".yml", ".yaml", ".toml", "") or path == Path(__file__):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for name in set(re.findall(r"\b([A-Z][A-Z_]+\.md)\b", text)):
            if not tracked(f"*{name}") and not (path.parent / name).exists():
                missing.append(f"{path.relative_to(ROOT)} cites {name}")
    assert missing == []
