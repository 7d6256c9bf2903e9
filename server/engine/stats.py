"""Counts of the engine's forward batches, served at GET /v1/stats."""

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

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "batches": self.batches,
                "requests": self.requests,
                "max_batch_size_seen": max(self.sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())},
                "recent": list(self.recent),
            }
