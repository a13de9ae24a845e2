"""Issuing a certificate: the facts only the service can state, then its signature.

The job code (``worker.jobs``) calls :func:`issue` inside the transaction that moves the job to
``succeeded`` and stores the certificate, so what is signed is exactly what is stored:

- ``job_id``, ``seed_source`` (``derived``: HMAC under the server secret; ``client``);
- ``prior_runs``: how many certificates this service issued before this one to the same client
  for the same tensor (``tensor_sha256``) and model (checkpoint file), whatever the seed and
  parameters. It is counted under a lock on the client's key row (Postgres; SQLite holds its
  write lock already), so two runs finishing at once see each other in commit order;
- ``issued_at`` (UTC), the service ``version``, the certificate ``schema``;
- ``key_id`` and ``signature`` (``domain.trust.signing``).
"""

from __future__ import annotations

import datetime as dt
from functools import lru_cache
from importlib import metadata
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from domain.keys import lock_key
from domain.store.tables import Certificate, Checkpoint, Job
from domain.trust.signing import Signer

SCHEMA = 2  # 1: the unsigned bodies stored before signing existed
PACKAGE = "dmae-certify"


@lru_cache(maxsize=1)
def service_version() -> str:
    """The installed package's version (``unknown`` when run from a tree that is not)."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return "unknown"


def prior_runs(session: Session, job: Job) -> int:
    """Certificates already issued to ``job``'s client for its tensor and model (any seed, any
    parameters), read under a lock on the client's key row until the caller commits."""
    lock_key(session, job.owner_id)
    model = select(Checkpoint.file_sha256).where(Checkpoint.id == job.checkpoint_id)
    count = session.scalar(
        select(func.count())
        .select_from(Certificate)
        .join(Job, Job.id == Certificate.job_id)
        .join(Checkpoint, Checkpoint.id == Job.checkpoint_id)
        .where(
            Job.owner_id == job.owner_id,
            Job.tensor_sha256 == job.tensor_sha256,
            Checkpoint.file_sha256 == model.scalar_subquery(),
            Job.id != job.id,
        )
    )
    return int(count or 0)


def issue(session: Session, job: Job, body: dict[str, Any], signer: Signer) -> dict[str, Any]:
    """``body`` (the run's certificate) with the service's facts added, signed by ``signer``.
    Call inside the transaction that stores it, after the job's move to ``succeeded``."""
    issued = dict(body)
    issued.update(
        job_id=job.id,
        seed_source=job.seed_source or "unknown",
        prior_runs=prior_runs(session, job),
        issued_at=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        version=service_version(),
        schema=SCHEMA,
    )
    return signer.sign(issued)
