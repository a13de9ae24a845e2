"""GET /models: the models a client can certify with."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from app.auth import Client, SessionDep
from app.errors import error_responses
from app.routes.deps import SessionEndingRoute
from app.schemas import ModelOut, model_out
from domain.store.tables import Checkpoint

router = APIRouter(
    route_class=SessionEndingRoute, tags=["models"], responses=error_responses(401, 429, 503)
)


@router.get("/models", response_model=list[ModelOut], summary="Active registered models")
def list_models(client: Client, session: SessionDep) -> list[ModelOut]:
    """Active classifiers with the sigma they were trained for, their classes, input size and
    licence note. POST /certify without a model runs on the sigma's ``default`` one."""
    del client
    rows = session.scalars(
        select(Checkpoint)
        .where(Checkpoint.active.is_(True), Checkpoint.kind == "classifier")
        .order_by(Checkpoint.sigma, Checkpoint.name)
    ).all()
    return [model_out(r) for r in rows]
