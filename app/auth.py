"""Who is calling: the ``X-API-Key`` header checked against the stored keys
(``domain.keys``), as FastAPI dependencies (``Client``, ``Admin``, ``SessionDep``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader
from sqlalchemy.orm import Session

from domain.errors import ServiceError
from domain.keys import Caller

HEADER = "X-API-Key"

api_key_header = APIKeyHeader(
    name=HEADER, auto_error=False, description="An API key made by `dmae-certify keys create`."
)


def get_session(request: Request) -> Iterator[Session]:
    """A database session for one request."""
    with request.app.state.db.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def current_client(
    request: Request,
    session: SessionDep,
    token: Annotated[str | None, Depends(api_key_header)],
) -> Caller:
    """The caller's key; 401 without a valid one, 429 when it is over its rate limit."""
    from app import ratelimit

    if not token:
        raise ServiceError(401, f"missing API key: send it in the {HEADER} header")
    key = request.app.state.keys.resolve(session, token)
    if key is None:
        raise ServiceError(401, "invalid or revoked API key")
    settings = request.app.state.settings
    ratelimit.check(
        getattr(request.app.state, "limiter", None),
        key.id,
        settings.rate_limit_requests,
        settings.rate_limit_window_s,
    )
    return key


Client = Annotated[Caller, Depends(current_client)]


def require_admin(client: Client) -> Caller:
    """The caller's key if it is an admin key; 403 otherwise."""
    if not client.is_admin:
        raise ServiceError(403, "this route needs an admin key")
    return client


Admin = Annotated[Caller, Depends(require_admin)]
