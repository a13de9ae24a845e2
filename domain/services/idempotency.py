"""``Idempotency-Key`` on POST /certify: a client may retry a submission safely.

The key is remembered per client with a fingerprint of the request (the image's sha256 and the
parameters as sent) and, once the request is done, the job it made:

- same key, same request: the same job (200), whatever happened to it since;
- same key, another request: 422;
- same key while the first request is still being processed: 409 with ``Retry-After``;
- a request that failed before making a job (bad input, database down) frees its key, so a
  retry is processed afresh; a key whose request died mid-way is freed after
  ``idempotency_in_flight_s``, and every key is forgotten after ``idempotency_ttl_s``.

The reservation is a row with a unique (client, key) constraint, so this holds across API
processes sharing the database.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from domain.config import Settings
from domain.errors import ServiceError, bad_input
from domain.services.submissions import Params
from domain.store.db import utcnow
from domain.store.state import rowcount
from domain.store.tables import IdempotencyKey

log = logging.getLogger("dmae.api")

HEADER = "Idempotency-Key"
KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")  # visible ASCII, as in HTTP header tokens


def fingerprint(image_sha256: str, p: Params) -> str:
    """What makes two requests the same request: the image bytes and the fields as sent."""
    fields = {"image": image_sha256, **dataclasses.asdict(p)}
    for later in ("target_radius", "time_budget_s"):  # unset: the fingerprint of old requests
        if fields[later] is None:
            del fields[later]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def check_key(key: str) -> str:
    if not KEY_RE.match(key):
        raise bad_input(
            f"{HEADER} must be 1-255 visible ASCII characters (e.g. a UUID), got {key[:80]!r}"
        )
    return key


def reserve(session: Session, owner_id: int, key: str, fp: str, settings: Settings) -> str | None:
    """Hold ``key`` for this request. None: proceed (then :func:`complete` or :func:`release`);
    a job id: the key's earlier, identical request made that job. Raises 422 or 409. Commits."""
    check_key(key)
    for _ in range(5):
        now = utcnow()
        row = session.scalar(
            select(IdempotencyKey).where(
                IdempotencyKey.owner_id == owner_id, IdempotencyKey.key == key
            )
        )
        if row is None:
            session.add(IdempotencyKey(owner_id=owner_id, key=key, fingerprint=fp, created_at=now))
            try:
                session.commit()
                return None
            except IntegrityError:  # another request took it meanwhile
                session.rollback()
                continue
        age = (now - row.created_at).total_seconds()
        limit = settings.idempotency_ttl_s if row.job_id else settings.idempotency_in_flight_s
        if age > limit:  # forgotten, or its request died: take it over (compare-and-set)
            taken = rowcount(
                session.execute(
                    update(IdempotencyKey)
                    .where(IdempotencyKey.id == row.id, IdempotencyKey.created_at == row.created_at)
                    .values(fingerprint=fp, job_id=None, created_at=now)
                )
            )
            session.commit()
            if taken:
                return None
            session.expire(row)
            continue
        if row.fingerprint != fp:
            raise bad_input(
                f"{HEADER} {key!r} was already used with a different request (another image or "
                "other parameters); use a new key for a new request"
            )
        if row.job_id is None:
            raise ServiceError(
                409,
                f"a request with {HEADER} {key!r} is still being processed; retry shortly",
                {"Retry-After": "1"},
            )
        return row.job_id
    raise ServiceError(409, f"{HEADER} {key!r} is contended; retry shortly", {"Retry-After": "1"})


def complete(session: Session, owner_id: int, key: str, job_id: str) -> None:
    """Bind the held key to the job its request made. Commits."""
    session.execute(
        update(IdempotencyKey)
        .where(
            IdempotencyKey.owner_id == owner_id,
            IdempotencyKey.key == key,
            IdempotencyKey.job_id.is_(None),
        )
        .values(job_id=job_id)
    )
    session.commit()


def release(session: Session, owner_id: int, key: str) -> None:
    """Free a held key whose request made no job, so a retry is processed afresh. Never raises
    (if the database is down, the key frees itself after ``idempotency_in_flight_s``)."""
    try:
        session.rollback()
        session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.owner_id == owner_id,
                IdempotencyKey.key == key,
                IdempotencyKey.job_id.is_(None),
            )
        )
        session.commit()
    except Exception as exc:
        log.warning("could not free %s %r: %s", HEADER, key, exc)
