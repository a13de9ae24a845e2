"""Who is calling: the ``X-API-Key`` header checked against the stored keys
(``domain.keys``), as FastAPI dependencies (``Client``, ``Admin``, ``SessionDep``).

Each is an ``async`` dependency that does no blocking I/O on the event loop: a request costs one
worker-thread hand-off, for its route, where the database work happens (a cached key, the
rate-limit check in Redis and a session's creation need none; a key not yet cached is looked up
in a worker thread).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, Request
from fastapi.security import APIKeyHeader
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from domain.errors import ServiceError
from domain.keys import Caller

HEADER = "X-API-Key"
log = logging.getLogger("dmae.api")

api_key_header = APIKeyHeader(
    name=HEADER, auto_error=False, description="An API key made by `dmae-certify keys create`."
)


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A database session for one request. It connects at its first statement (in the route's
    worker thread); afterwards it is closed, which rolls back whatever the route left
    uncommitted, in a thread only when there is a transaction to end.

    That thread is not one of the routes' (``DMAE_API_THREADS``) but one of the closers'
    (``app.state.session_closers``, as many as the pool has connections): waiting behind new
    routes for a routes' thread, a session kept its connection while those routes took more,
    until 100 concurrent re-submissions emptied the pool and routes waited its 30 s timeout."""
    session = request.app.state.db.sessions()
    try:
        yield session
    finally:
        if session.in_transaction():
            closers = request.app.state.session_closers
            await anyio.to_thread.run_sync(end_session, session, limiter=closers)
        else:
            session.close()  # nothing to send to the database


def end_session(session: Session) -> None:
    """Close ``session``, rolling back what it left open; if its connection died meanwhile,
    the pool drops it and one line is logged (the request's answer stands)."""
    try:
        session.close()
    except DBAPIError as exc:
        log.warning("ending a request's session failed: %s", str(exc).splitlines()[0][:300])


SessionDep = Annotated[Session, Depends(get_session)]


async def current_client(
    request: Request, token: Annotated[str | None, Depends(api_key_header)]
) -> Caller:
    """The caller's key; 401 without a valid one, 429 when it is over its rate limit."""
    from app import ratelimit

    if not token:
        raise ServiceError(401, f"missing API key: send it in the {HEADER} header")
    keys = request.app.state.keys
    key = keys.cached(token)
    if key is None:
        key = await run_in_threadpool(keys.look_up, request.app.state.db, token)
    if key is None:
        raise ServiceError(401, "invalid or revoked API key")
    settings = request.app.state.settings
    await ratelimit.check(
        getattr(request.app.state, "limiter", None),
        key.id,
        settings.rate_limit_requests,
        settings.rate_limit_window_s,
    )
    return key


Client = Annotated[Caller, Depends(current_client)]


async def require_admin(client: Client) -> Caller:
    """The caller's key if it is an admin key; 403 otherwise."""
    if not client.is_admin:
        raise ServiceError(403, "this route needs an admin key")
    return client


Admin = Annotated[Caller, Depends(require_admin)]
