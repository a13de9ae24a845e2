"""Liveness and readiness probes (no authentication): for load balancers and compose."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from app.auth import SessionDep
from app.errors import error_responses
from app.routes.deps import SessionEndingRoute, SettingsDep

router = APIRouter(route_class=SessionEndingRoute, tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The database answers",
    responses=error_responses(503, why={503: "The database is unavailable."}),
)
def readyz(session: SessionDep, settings: SettingsDep) -> dict[str, str]:
    """200 when the database answers (503 with a message otherwise)."""
    session.execute(text("SELECT 1"))
    return {"status": "ready", "runner": "embedded" if settings.embedded else "celery"}
