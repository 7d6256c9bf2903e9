"""What the engine hands back: one record per request that changed in an
iteration, put on one channel.

The scheduler's thread calls nothing else on the caller's side: it builds
`Output` records and passes each iteration's list to its sink's `put`, the one
place where its thread meets the caller's. The API's sink
(server/output_router.py) forwards them to the event loop; `Collected`, here, keeps
them for callers without an event loop (benchmarks, tests, offline scoring).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

from server.engine.request import ClassifyResult, GenerateResult


@dataclass(slots=True)  # not frozen: a frozen dataclass costs 4x to build, and 64 rows make 64 a step
class Output:
    """What changed for one request (read-only once handed over). A request's
    last record is the one with `result` or `error`; before it, a streamed
    generate request gets a record whenever its tokens complete more text that
    no later token can change."""

    request_id: int
    token_ids: tuple[int, ...] = ()  # tokens chosen since the request's previous record
    text: str = ""  # streamed: text settled since the previous record
    result: GenerateResult | ClassifyResult | None = None  # the answer, on the last record
    event: object | None = None  # a training run's progress (server/engine/training.py), before its last record
    error: Exception | None = None  # or what answers it instead

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None


class OutputSink(Protocol):
    def put(self, outputs: list[Output]) -> None:
        """Called by the scheduler's thread; must not block."""


@dataclass
class Collected:
    """A sink that keeps every request's last record, for callers that wait on
    a thread (`answer`), or run the scheduler's loop themselves."""

    finals: dict[int, Output] = field(default_factory=dict)
    records: list[Output] = field(default_factory=list)  # every record, in order
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def put(self, outputs: list[Output]) -> None:
        with self._cond:
            self.records.extend(outputs)
            self.finals.update((o.request_id, o) for o in outputs if o.finished)
            self._cond.notify_all()

    def final(self, request_id: int, timeout: float | None = None) -> Output:
        """The request's last record, waiting up to `timeout` seconds for it."""
        with self._cond:
            if not self._cond.wait_for(lambda: request_id in self.finals, timeout):
                raise TimeoutError(f"request {request_id} was not answered within {timeout} s")
            return self.finals[request_id]

    def answer(self, request_id: int, timeout: float | None = None):
        """The request's result; its error is raised."""
        out = self.final(request_id, timeout)
        if out.error is not None:
            raise out.error
        return out.result
