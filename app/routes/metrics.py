"""GET /metrics: Prometheus text format (open by default; DMAE_METRICS_REQUIRE_ADMIN locks it).

HTTP latency and request counts by route and status come from
prometheus-fastapi-instrumentator on a registry of this app; job, sample, batch and model-load
metrics from ``domain.metrics``; ``dmae_queue_depth`` is read from the database on each scrape.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator import metrics as http_metrics
from sqlalchemy import func, select

from app.auth import HEADER
from app.errors import error_responses
from app.routes.deps import SessionEndingRoute
from domain import metrics
from domain.errors import ServiceError
from domain.keys import lookup
from domain.store.tables import Job, Status, TrainingRun

router = APIRouter(route_class=SessionEndingRoute, tags=["health"])


def instrument(app: FastAPI) -> None:
    """Time every request (by route template, method and status) into a registry of ``app``,
    and register the queue-depth collector reading ``app.state.db``."""
    registry = CollectorRegistry()
    instrumentator = Instrumentator(
        should_group_status_codes=False,
        excluded_handlers=["/metrics"],
        registry=registry,
    )
    instrumentator.add(
        http_metrics.latency(
            metric_namespace="dmae", should_include_status=True, registry=registry
        ),
        http_metrics.requests(metric_namespace="dmae", registry=registry),
    )
    instrumentator.instrument(app)

    def waiting() -> dict[str, int]:
        db = getattr(app.state, "db", None)
        if db is None:
            return {}
        with db.session() as s:
            counts = {}
            for name, table in (("jobs", Job), ("training", TrainingRun)):
                query = select(func.count()).select_from(table)
                counts[name] = int(s.scalar(query.where(table.status == Status.QUEUED.value)) or 0)
            return counts

    app.state.http_metrics = registry
    app.state.queue_depth = metrics.QueueDepth(waiting)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition."},
        **error_responses(
            401,
            403,
            503,
            why={
                401: "DMAE_METRICS_REQUIRE_ADMIN is set and no valid key was sent.",
                403: "DMAE_METRICS_REQUIRE_ADMIN is set and the key is not an admin's.",
            },
        ),
    },
)
def prometheus_metrics(request: Request) -> Response:
    """Jobs by mode and status, noisy samples by model and device, queue depth, job queue-wait
    and run durations, batch fill, model load time, device memory (CUDA), HTTP latency by
    route and status."""
    state = request.app.state
    if state.settings.metrics_require_admin:
        token = request.headers.get(HEADER, "")
        with state.db.session() as s:
            key = lookup(s, token)
            if key is None:
                raise ServiceError(401, f"send an admin API key in the {HEADER} header")
            if not key.is_admin:
                raise ServiceError(403, "the metrics need an admin key")
    body = metrics.render(state.http_metrics, state.queue_depth)
    return Response(body, media_type=metrics.CONTENT_TYPE)
