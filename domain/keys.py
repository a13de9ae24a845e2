"""API keys: high-entropy tokens of which only the sha256 is stored.

A key is a client: it sees only its own jobs and has its own rate limit. Admin keys may also
use the admin routes.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from domain.tables import ApiKey

TOKEN_PREFIX = "dmae_"


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
