"""The summary of a bench/gpu_check.sh run: one line per target, read from
the `RESULT {json}` lines and pytest's closing lines in the step logs of one
results folder. A figure whose step failed or ran out of time says so.

    python -m bench.gpu_summary RESULTS_DIR
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

TARGET_TOKENS_PER_S = 25_000
BEYOND_TOKENS_PER_S = 43_000
TARGET_STEP_MS = 2.5
TARGET_MIXED_VS_ONE_TASK = 0.95  # (a) within 5% of (b)
TARGET_VS_HF_GENERATE = 6.0


def results(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line[len("RESULT ") :]) for line in log.read_text().splitlines() if line.startswith("RESULT {")]


def modes(log: Path) -> dict[str, float]:
    """'(a)' -> tokens/s, from an engine benchmark's log."""
    return {r["mode"][:3]: r["tokens_per_s"] for r in results(log) if "mode" in r}


def pytest_line(log: Path) -> str:
    if not log.exists():
        return "did not run"
    lines = [ln.strip("= ") for ln in log.read_text().splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    return lines[-1] if lines else "no pytest summary (timed out or crashed: see the log)"


def verdict(ok: bool | None) -> str:
    return "unmeasured" if ok is None else ("MET" if ok else "missed")


def summary(folder: Path) -> list[str]:
    engine = modes(folder / "b-engine-llama-1b.log")
    steps = [r for r in results(folder / "c-step-time.log") if "step_ms" in r]
    small = modes(folder / "d-engine-smollm2-135m.log")
    a, b, c, g = (engine.get(k) for k in ("(a)", "(b)", "(c)", "(g)"))
    best = max((x for x in (a, g) if x), default=None)
    at64 = {r["how"]: r for r in steps if r["rows"] == max(s["rows"] for s in steps)} if steps else {}
    fastest = min(at64.values(), key=lambda r: r["step_ms"]) if at64 else None

    def fmt(x, unit=""):
        return "-" if x is None else f"{x:,.2f}{unit}" if x < 100 else f"{x:,.0f}{unit}"

    lines = [
        f"tests, graphs on (float32):      {pytest_line(folder / 'a1-tests-graphs.log')}",
        f"tests, graphs + compile:         {pytest_line(folder / 'a2-tests-compile.log')}",
        f"(a) tokens/s >= {TARGET_TOKENS_PER_S:,}:          {fmt(a)}  "
        f"{verdict(None if a is None else a >= TARGET_TOKENS_PER_S)}" + (f"  (g, compiled: {fmt(g)})" if g else ""),
    ]
    if at64:
        rows = fastest["rows"]
        per = ", ".join(f"{how} {r['step_ms']:.3f} ms" for how, r in at64.items())
        lines.append(f"decode step <= {TARGET_STEP_MS} ms at {rows} rows:  {per}  "
                     f"{verdict(fastest['step_ms'] <= TARGET_STEP_MS)}")  # fmt: skip
    else:
        lines.append(f"decode step <= {TARGET_STEP_MS} ms at 64 rows:   -  unmeasured")
    ab = a / b if a and b else None
    lines.append(f"(a) within 5% of (b):            (a)/(b) = {fmt(ab)}  "
                 f"{verdict(None if ab is None else ab >= TARGET_MIXED_VS_ONE_TASK)}")  # fmt: skip
    ac = a / c if a and c else None
    lines.append(f"(a) >= {TARGET_VS_HF_GENERATE:g}x (c) HF generate:     (a)/(c) = {fmt(ac)}  "
                 f"{verdict(None if ac is None else ac >= TARGET_VS_HF_GENERATE)}")  # fmt: skip
    lines.append(f"beyond: >= {BEYOND_TOKENS_PER_S:,} tokens/s:      best of (a), (g) = {fmt(best)}  "
                 f"{verdict(None if best is None else best >= BEYOND_TOKENS_PER_S)}")  # fmt: skip
    row_a = next((r for r in results(folder / "b-engine-llama-1b.log") if r.get("mode", "").startswith("(a)")), None)
    if row_a:  # where (a)'s wall time goes: what to work on next
        ttft, prefill, step = row_a["ttft_p50_ms"], row_a.get("prefill_ms"), row_a.get("step_ms")
        lines.append(f"(a) time to first token p50:     {fmt(ttft, ' ms')} (prefill batch {fmt(prefill, ' ms')}), "
                     f"engine step {fmt(step, ' ms')}")  # fmt: skip
    h = engine.get("(h)")
    if a and h:  # cuDNN attention off (ptserve's choice) against PyTorch's default, side by side
        lines.append(f"cuDNN attention off vs allowed:  (a)/(h) = {a / h:.2f}")
    sa, sc = small.get("(a)"), small.get("(c)")
    lines.append(f"SmolLM2-135M shape (a) vs (c):   {fmt(sa)} vs {fmt(sc)} tokens/s"
                 + (f", {sa / sc:.2f}x" if sa and sc else ""))  # fmt: skip
    for r in results(folder / "b-engine-llama-1b.log"):
        if "note" in r:
            lines.append(r["note"])
    return lines


def main() -> None:
    folder = Path(sys.argv[1])
    lines = summary(folder)
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
