"""API keys: high-entropy tokens of which only the sha256 is stored.

A key is a client: it sees only its own jobs and has its own rate limit. Admin keys may also
use the admin routes.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from domain.store.db import Database
from domain.store.tables import ApiKey

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


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: the key's id (the owner of its jobs) and whether it is admin."""

    id: int
    is_admin: bool


class KeyCache:
    """Live keys by token hash for ``ttl_s`` seconds, so a request costs no key query.

    A revoked key keeps working at most ``ttl_s`` seconds longer on each API process; unknown
    and revoked tokens are never cached (each such request asks the database)."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._known: dict[str, tuple[Caller, float]] = {}
        self._lock = threading.Lock()

    def cached(self, token: str) -> Caller | None:
        """The caller with this token if it was looked up less than ``ttl_s`` ago (no I/O)."""
        if not token or len(token) > 200:
            return None
        return self._fresh(hash_token(token))

    def _fresh(self, digest: str) -> Caller | None:
        with self._lock:
            hit = self._known.get(digest)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        return None

    def resolve(self, session: Session, token: str) -> Caller | None:
        """The caller with this token, or None for a missing, unknown or revoked one."""
        if not token or len(token) > 200:
            return None
        digest = hash_token(token)
        hit = self._fresh(digest)
        if hit is not None:
            return hit
        key = lookup(session, token)
        if key is None:
            return None
        caller = Caller(key.id, key.is_admin)
        if self.ttl_s > 0:
            now = time.monotonic()
            with self._lock:
                if len(self._known) > 10_000:  # bound the memory: forget the expired ones
                    self._known = {k: v for k, v in self._known.items() if v[1] > now}
                self._known[digest] = (caller, now + self.ttl_s)
        return caller

    def look_up(self, db: Database, token: str) -> Caller | None:
        """:meth:`resolve` in a session of its own (blocking: call it from a worker thread)."""
        with db.session() as session:
            return self.resolve(session, token)


# Built once: every submission takes this lock.
_LOCK = select(ApiKey.id).where(ApiKey.id == bindparam("owner")).with_for_update(key_share=True)


def lock_key(session: Session, owner_id: int) -> None:
    """Lock the client's key row until the session's transaction ends (PostgreSQL: ``FOR NO KEY
    UPDATE``, which the foreign-key locks of the client's job rows do not conflict with; SQLite:
    nothing, its write lock serialises writers). Every admission count, evaluation cancel and
    prior-runs count of one client takes it, so they run one after another."""
    session.connection().execute(_LOCK, {"owner": owner_id})
