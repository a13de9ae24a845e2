"""Replays: re-running a finished job with its seed to check that its counts come out the same.

A replay is a job of its own (``replay_of`` = the original's id, owned by the admin who asked),
so it runs on the normal machinery, the embedded runner or a Celery worker alike, and is
claimed, heart-beaten, cancelled and swept like any job. It never makes a certificate: the job
code stores what it found in ``replay_result`` (``domain.trust.replay_compare``), so the
original keeps its one certificate, the replay is exempt from the no-re-roll key (each request
is a new replay) and it is not counted in any certificate's ``prior_runs``.

Counts are reproducible for the same seed, model and kind of device (the noise is a seeded
float32 stream; CUDA runs the network in bf16, the CPU in float32), so a replay on another kind
of device than the original's may legitimately differ; the comparison says which kinds ran.
"""

from __future__ import annotations

import hashlib
import json

from sqlalchemy import select
from sqlalchemy.orm import Session

from domain import events
from domain.config import Settings
from domain.errors import ServiceError, not_found
from domain.keys import Caller
from domain.services.submissions import admit
from domain.store.tables import Certificate, Job, JobInput, Status, new_id


def submit_replay(session: Session, admin: Caller, job_id: str, settings: Settings) -> Job:
    """Store and return a queued replay of job ``job_id`` (any client's). 404 if there is no
    such job; 409 if it has no certificate (not finished, failed, cancelled) or is a replay."""
    original = session.get(Job, job_id)
    if original is None:
        raise not_found(f"job {job_id!r}")
    if original.replay_of is not None:
        raise ServiceError(
            409, f"job {job_id} is itself a replay (of {original.replay_of}): replay that job"
        )
    has_certificate = session.scalar(select(Certificate.id).where(Certificate.job_id == job_id))
    if has_certificate is None:
        raise ServiceError(
            409, f"job {job_id} has no certificate to replay (it is {original.status})"
        )
    stored = session.get(JobInput, job_id)
    if stored is None:
        raise ServiceError(409, f"the input of job {job_id} is no longer stored")
    replay_id = new_id()
    replay = Job(
        id=replay_id,
        owner_id=admin.id,
        request_key=hashlib.sha256(
            json.dumps({"replay_of": job_id, "replay": replay_id}).encode()
        ).hexdigest(),  # unique: a replay is never "the identical request" of another
        mode=original.mode,
        checkpoint_id=original.checkpoint_id,
        model_name=original.model_name,
        sigma=original.sigma,
        alpha=original.alpha,
        n0=original.n0,
        n=original.n,
        seed=original.seed,
        seed_source=original.seed_source,
        input_sha256=original.input_sha256,
        tensor_sha256=original.tensor_sha256,
        input_record=dict(original.input_record or {}),
        input_shape=list(original.input_shape),
        status=Status.QUEUED.value,
        progress_done=0,
        progress_total=original.n0 + original.n,
        attempts=0,
        replay_of=job_id,
        target_radius=original.target_radius,
        time_budget_s=original.time_budget_s,  # not used: a replay draws the original's n_used
    )
    session.add(replay)
    session.add(JobInput(job_id=replay_id, shape=list(stored.shape), data=stored.data))
    session.flush()
    admit(session, admin.id, settings)
    session.commit()
    events.job_changed(
        replay_id, Status.QUEUED.value, events.JobFacts(replay.mode, replay.model_name)
    )
    return replay
