"""Counts of the engine's forward batches and of the tokens it generated per
task, served at GET /v1/stats and read by /metrics when scraped."""

from __future__ import annotations

import threading
from collections import Counter, deque


class BatchStats:
    def __init__(self, recent: int = 1024):
        self._lock = threading.Lock()
        self.batches = 0
        self.requests = 0
        self.sizes: Counter[int] = Counter()
        self.recent: deque[dict] = deque(maxlen=recent)
        self.generated: Counter[str] = Counter()  # task id -> tokens of its answered generate requests

    def record(self, kind: str, size: int, num_tasks: int, seconds: float) -> None:
        """One forward batch of `size` rows: prefill, decode or classify (a
        request's row appears again in every decode step; `requests` counts
        prefill and classify rows only)."""
        with self._lock:
            self.batches += 1
            if kind != "decode":
                self.requests += size
            self.sizes[size] += 1
            self.recent.append({"kind": kind, "size": size, "tasks": num_tasks, "seconds": round(seconds, 4)})

    def count_generated(self, task_id: str, tokens: int) -> None:
        """A generate request of this task was answered with `tokens` tokens:
        the one place generated tokens are counted."""
        with self._lock:
            self.generated[task_id] += tokens

    def forget(self, task_id: str) -> None:
        """The task was deleted: its count goes, so that /metrics does not grow with deleted tasks."""
        with self._lock:
            self.generated.pop(task_id, None)

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "batches": self.batches,
                "requests": self.requests,
                "max_batch_size_seen": max(self.sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
                "recent": list(self.recent),
                "generated_tokens": dict(self.generated),
            }
