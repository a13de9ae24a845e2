"""API keys: high-entropy tokens of which only the sha256 is stored; FastAPI dependencies.

A key is a client: it sees only its own jobs and has its own rate limit (``app.ratelimit``).
Admin keys may also use the admin routes.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import ServiceError
from app.tables import ApiKey

TOKEN_PREFIX = "dmae_"
HEADER = "X-API-Key"

api_key_header = APIKeyHeader(
    name=HEADER, auto_error=False, description="An API key made by `dmae-certify keys create`."
)


def generate_token() -> str:
    """A new token: 256 random bits, URL-safe, recognisable by its prefix."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_key(session: Session, name: str = "", admin: bool = False) -> tuple[ApiKey, str]:
    """Store a new key (hashed) and return it with its token, which is not kept anywhere."""
    token = generate_token()
    key = ApiKey(
        name=name,
        key_prefix=token[: len(TOKEN_PREFIX) + 6],
        key_hash=hash_token(token),
        is_admin=admin,
    )
    session.add(key)
    session.commit()
    return key, token


def count_keys(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(ApiKey)) or 0)


def lookup(session: Session, token: str) -> ApiKey | None:
    """The live key with this token, or None."""
    if not token or len(token) > 200:
        return None
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_token(token)))
    if key is None or key.revoked_at is not None:
        return None
    return key


def get_session(request: Request) -> Iterator[Session]:
    """A database session for one request."""
    with request.app.state.db.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def current_client(
    request: Request,
    session: SessionDep,
    token: Annotated[str | None, Depends(api_key_header)],
) -> ApiKey:
    """The caller's key; 401 without a valid one, 429 when it is over its rate limit."""
    from app import ratelimit

    if not token:
        raise ServiceError(401, f"missing API key: send it in the {HEADER} header")
    key = lookup(session, token)
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


Client = Annotated[ApiKey, Depends(current_client)]


def require_admin(client: Client) -> ApiKey:
    """The caller's key if it is an admin key; 403 otherwise."""
    if not client.is_admin:
        raise ServiceError(403, "this route needs an admin key")
    return client


Admin = Annotated[ApiKey, Depends(require_admin)]
