"""Prometheus metrics of the service, shared by the HTTP layer and the execution layer.

Metrics live in the process that records them. One API process with the embedded runner shows
everything on its ``GET /metrics``. With Celery, each worker serves its own (``dmae-certify
worker --metrics-port``) and Prometheus adds them up; a process that forks children (Celery
prefork, several uvicorn workers) uses prometheus_client's multiprocess mode: set
``PROMETHEUS_MULTIPROC_DIR`` to an empty folder before the process starts, and :func:`render`
aggregates the folder (docs/DEPLOYMENT.md, "Metrics").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST

JOBS = Counter(
    "dmae_jobs", "Certification jobs entering a status (queued, running, succeeded, ...).",
    ["mode", "status"],
)  # fmt: skip
SAMPLES = Counter(
    "dmae_samples", "Noisy copies classified (forward passes of one sample).", ["model", "device"]
)
JOB_SECONDS = Histogram(
    "dmae_job_duration_seconds",
    "Time a job spent waiting in the queue (phase=queue_wait) and running (phase=run).",
    ["mode", "phase"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600),
)
BATCH_FILL = Histogram(
    "dmae_batch_fill_ratio",
    "Rows of a forward pass used by jobs, over the rows the engine could put in it.",
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0),
)
MODEL_LOAD_SECONDS = Histogram(
    "dmae_model_load_seconds",
    "Time to read, verify and place one model on its device.",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DEVICE_MEMORY = Gauge(
    "dmae_device_memory_bytes",
    "CUDA memory allocated by this process's engine (CUDA devices only).",
    ["device"],
    multiprocess_mode="livesum",
)


class QueueDepth(Collector):
    """``dmae_queue_depth``: jobs and training runs waiting, read from the database on scrape.

    ``count`` is a callable returning {queue name: waiting count} (e.g. a database query)."""

    def __init__(self, count: Callable[[], dict[str, int]]):
        self.count = count

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "dmae_queue_depth",
            "Jobs (queue=jobs) and training runs waiting to run.",
            labels=["queue"],
        )
        for queue, value in sorted(self.count().items()):
            family.add_metric([queue], float(value))
        yield family


def multiprocess_dir() -> str | None:
    """The multiprocess folder when this process runs in prometheus_client's multiprocess mode."""
    return os.environ.get(MULTIPROC_ENV) or None


def render(*extra: CollectorRegistry | Collector) -> bytes:
    """The text exposition of this process's metrics (or, in multiprocess mode, of every
    process writing to the folder) plus ``extra`` registries or collectors."""
    folder = multiprocess_dir()
    if folder is None:
        parts = [generate_latest(REGISTRY)]
        for item in extra:
            parts.append(
                generate_latest(item if isinstance(item, CollectorRegistry) else _one(item))
            )
        return b"".join(parts)
    registry = CollectorRegistry()
    collect: Callable[..., object] = MultiProcessCollector  # prometheus_client is untyped
    collect(registry, path=folder)
    for item in extra:
        if not isinstance(item, CollectorRegistry):  # registries' metrics are in the folder
            registry.register(item)
    return generate_latest(registry)


def _one(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry
