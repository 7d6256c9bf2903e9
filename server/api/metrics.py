"""Prometheus metrics, one registry per app (no module-level state).

Request counts and latencies are observed by an ASGI middleware; engine
figures (queue depth, running rows, batch sizes, prompt and prefix caches)
are read from the engine when /metrics is scraped, so serving pays nothing
for them.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from prompt_store.store import is_task_id

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, engine_of):
        """engine_of(): the running Engine, or None while starting."""
        self.registry = CollectorRegistry()
        self.requests = Counter("ptserve_requests", "HTTP requests by route, task and status code",
                                ["route", "task", "code"], registry=self.registry)  # fmt: skip
        self.latency = Histogram("ptserve_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)  # fmt: skip
        self.registry.register(_EngineCollector(engine_of))
        self.engine_of = engine_of
        self._tasks: set[str] = set()  # task labels the request series were given
        self._lock = threading.Lock()  # _tasks: the event loop adds, a scrape's worker thread reads

    def count(self, route: str, task: str, code: int, seconds: float) -> None:
        """One HTTP request, as the middleware saw it."""
        if task:
            with self._lock:
                self._tasks.add(task)
        self.requests.labels(route, task, str(code)).inc()
        self.latency.labels(route).observe(seconds)

    def forget_task(self, task_id: str) -> None:
        """Drop every series labelled with this task (it was deleted), so that
        /metrics does not grow with tasks that no longer exist."""
        with self._lock:
            self._tasks.discard(task_id)
        self.requests.remove_by_labels({"task": task_id})
        engine = self.engine_of()
        if engine is not None:
            engine.batch_stats.forget(task_id)  # its generated tokens

    def render(self) -> bytes:
        """The scrape (blocking: it asks the store which labelled tasks still exist)."""
        self._prune()
        return generate_latest(self.registry)

    def _prune(self) -> None:
        """The series of tasks that no longer exist go, on every replica: whichever
        replica took the DELETE, and even when a request of the task finished
        (and counted) after it. Costs one store lookup per task with series."""
        engine = self.engine_of()
        if engine is None:
            return
        with self._lock:
            labelled = set(self._tasks)
        for task in labelled | set(engine.batch_stats.snapshot()["generated_tokens"]):
            if not is_task_id(task):  # "(hand-written)": not a stored task, one series at most
                continue
            try:
                gone = engine.store.identity(task) is None
            except Exception:  # the store is down: keep them; a later scrape prunes
                return
            if gone:
                self.forget_task(task)


class _EngineCollector:
    def __init__(self, engine_of):
        self.engine_of = engine_of

    def collect(self):
        engine = self.engine_of()
        if engine is None:
            return
        stats = engine.stats()
        yield GaugeMetricFamily("ptserve_queue_depth", "requests waiting for the model", value=stats["queue_depth"])
        if stats["running"] is not None:
            yield GaugeMetricFamily("ptserve_running_rows", "rows decoding now (continuous engine)",
                                    value=stats["running"])  # fmt: skip
        for cache in ("prompt_cache", "prefix_cache"):
            if stats.get(cache) is None:
                continue
            for event in ("hits", "misses", "evictions"):
                yield CounterMetricFamily(f"ptserve_{cache}_{event}", f"{cache.replace('_', ' ')} {event}",
                                          value=stats[cache][event])  # fmt: skip
            yield GaugeMetricFamily(f"ptserve_{cache}_size", f"entries in the {cache.replace('_', ' ')}",
                                    value=stats[cache]["size"])  # fmt: skip
        ft = stats["fine_tuning"]
        jobs = GaugeMetricFamily("ptserve_fine_tuning_jobs", "this server's fine-tuning jobs, by status",
                                 labels=["status"])  # fmt: skip
        jobs.add_metric(["running"], 1 if ft["running"] else 0)
        jobs.add_metric(["queued"], ft["queued"])
        yield jobs
        yield CounterMetricFamily(
            "ptserve_training_passes", "training passes run on the model", value=ft["training_passes"]
        )
        for kind in ("training", "inference"):  # the share of model time training takes: their rates
            yield CounterMetricFamily(f"ptserve_{kind}_seconds", f"model time spent on {kind} forward passes",
                                      value=ft[f"{kind}_seconds"])  # fmt: skip
        generated = CounterMetricFamily("ptserve_generated_tokens", "tokens generated, by task", labels=["task"])
        for task, tokens in sorted(stats["batches"]["generated_tokens"].items()):
            generated.add_metric([task], tokens)
        yield generated
        sizes = {int(k): v for k, v in stats["batches"]["batch_sizes"].items()}
        buckets, seen = [], 0
        for bound in BATCH_BUCKETS:
            seen = sum(v for k, v in sizes.items() if k <= bound)
            buckets.append((str(bound), seen))
        buckets.append(("+Inf", sum(sizes.values())))
        yield HistogramMetricFamily("ptserve_batch_size", "rows per forward batch", buckets=buckets,
                                    sum_value=sum(k * v for k, v in sizes.items()))  # fmt: skip


class MetricsMiddleware:
    """ASGI middleware: counts every HTTP request by route template, task and status."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            code = status["code"]
            # task ids of refused requests are not labels: anyone could invent them
            task = (scope.get("path_params") or {}).get("task_id", "") if code < 400 else ""
            if scope["method"] == "DELETE" and task:  # the task is gone: so are its series
                self.metrics.forget_task(task)
                task = ""
            self.metrics.count(path, task, code, time.perf_counter() - start)
