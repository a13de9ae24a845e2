"""THE job code: run one certification job by id. Shared by the Celery task and the embedded
in-process runner.

1. Claim the job by compare-and-set (queued, or running with a dead worker; attempts capped).
2. Load its model (cached per process) and its stored, already preprocessed input tensor.
3. Run the job's mode (``models.modes``: the one core) with its stored spec and seed, writing
   progress and a heartbeat to the job row, stopping when the job is cancelled.
4. Store exactly one certificate, in the same transaction as the compare-and-set to
   ``succeeded``, signed there with its ``prior_runs`` (``domain.certificates.issue``); a
   redelivered or re-claimed task cannot add a second one. A replay job
   (``domain.services.replays``) stores what it found in ``replay_result`` instead, and no
   certificate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy import select

from domain import certificates, events, metrics
from domain.config import Settings, get_settings
from domain.store import state
from domain.store.db import Database, get_database
from domain.store.tables import Certificate, Checkpoint, Job, JobInput, Status
from domain.trust import signing
from domain.trust.replay_compare import compare
from models.data import tensor_from_bytes
from models.modes import RunSpec, get_mode
from models.smoothing import Certificate as Result
from models.smoothing import Sampler
from models.training.recipes import recipe_name_of
from worker.model_cache import CACHE, LoadedModel, ModelRef
from worker.monitor import Aborted, Monitor

log = logging.getLogger("dmae.worker")
RECORD_FIELDS = ("original_size", "scale", "preprocessing", "warnings")


def sampler_for(loaded: LoadedModel, settings: Settings) -> Sampler:
    """The Sampler that turns a job's noisy copies into counts on ``loaded``'s model.

    The process's batching engine (worker/engine.py): concurrent jobs on the same model share
    batches, each with its own seeded noise, so a job's counts equal the CLI's for its seed.
    Precision as in the CLI: bf16 autocast on CUDA, float32 on CPU; noise always float32.
    """
    from worker.engine import shared_engine

    engine = shared_engine(loaded.device, batch_size=settings.batch_size or None)
    engine.register(loaded.engine_key, loaded.model, loaded.meta.num_classes)
    return engine.sampler(loaded.engine_key)


@dataclass
class Attempt:
    """One claimed attempt at a job: what reporting its end needs."""

    db: Database
    job_id: str
    token: str
    started: float = field(default_factory=time.perf_counter)
    who: events.JobFacts = events.UNKNOWN

    def fail(self, error: str) -> str:
        return _fail(self.db, self.job_id, self.token, error, self.who, self.started)


@dataclass(frozen=True)
class Claimed:
    """A claimed job's rows, read once: the run spec it was stored with (``Job.spec``), its
    input tensor, its model, what the certificate records of the input, and for a replay the
    replayed certificate (``original``)."""

    spec: RunSpec
    x: torch.Tensor
    ref: ModelRef
    input_sha256: str
    tensor_sha256: str
    input_record: dict[str, Any]  # original_size, scale, preprocessing, warnings (may be empty)
    queued_s: float
    original: dict[str, Any] | None = None
    replay_of: str | None = None


@dataclass(frozen=True)
class Sampled:
    """The core's certificate and what it ran on."""

    cert: Result
    loaded: LoadedModel
    model_load_s: float
    done: int  # samples drawn (the progress reported)


def run_job(
    job_id: str,
    settings: Settings | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> str:
    """Run job ``job_id`` if it can be claimed; returns what happened (for logs and tests)."""
    settings = settings or get_settings()
    db = get_database(settings.database_url)
    token, outcome = state.claim_with_new_token(db, Job, job_id, settings)
    if outcome is not state.Claim.CLAIMED:
        log.info("job %s not run: %s", job_id, outcome.value)
        if outcome is state.Claim.EXHAUSTED:
            _report(db, job_id, Status.FAILED.value, reason="attempts cap reached")
        return outcome.value
    attempt = Attempt(db, job_id, token)
    try:
        job = read_job(attempt)
    except Exception as exc:  # any failure here is the job's, reported on it
        return attempt.fail(f"could not read the job: {exc}")
    try:
        signer = signing.signer(settings) if job.original is None else None
    except signing.SigningError as exc:  # no certificate without a signature
        return attempt.fail(f"cannot sign certificates: {exc}")
    sampled = sample(attempt, job, settings, should_stop)
    if isinstance(sampled, str):
        return sampled
    if job.original is not None:
        found = compare(
            job.original, sampled.cert.to_dict(), str(sampled.loaded.device),
            replay_of=job.replay_of,
        )  # fmt: skip
        return _finish(db, job_id, token, sampled.done, attempt.who, attempt.started,
                       replay_result=found)  # fmt: skip
    assert signer is not None
    body = certificate_body(job, sampled, attempt.started)
    return store_certificate(attempt, body, signer, sampled.done)


def read_job(attempt: Attempt) -> Claimed:
    """The claimed job's rows (reports it running); LookupError when one is missing. A replay
    runs without the time budget and stops where the replayed run stopped (the same samples)."""
    with attempt.db.session() as s:
        job = s.get(Job, attempt.job_id)
        inp = s.get(JobInput, attempt.job_id)
        ckpt = s.get(Checkpoint, job.checkpoint_id) if job is not None else None
        if job is None or inp is None or ckpt is None:
            raise LookupError("the job's input or model record is missing")
        attempt.who = events.JobFacts(job.mode, job.model_name)
        wait = (job.started_at - job.created_at).total_seconds() if job.started_at else None
        events.job_changed(attempt.job_id, Status.RUNNING.value, attempt.who, queue_wait_s=wait)
        spec, original = job.spec(), None
        if job.replay_of is not None:
            original = s.scalar(select(Certificate.body).where(Certificate.job_id == job.replay_of))
            if original is None:
                raise LookupError(f"the replayed job {job.replay_of}'s certificate is gone")
            spec = spec.replaying(original)
        return Claimed(
            spec=spec,
            x=tensor_from_bytes(inp.data, inp.shape),
            ref=ModelRef.of(ckpt),
            input_sha256=job.input_sha256,
            tensor_sha256=job.tensor_sha256,
            input_record=dict(job.input_record or {}),
            queued_s=max(wait or 0.0, 0.0),
            original=original,
            replay_of=job.replay_of,
        )


def sample(
    attempt: Attempt, job: Claimed, settings: Settings, should_stop: Callable[[], bool] | None
) -> Sampled | str:
    """Load the model (cached per process) and run the job's mode on it under a
    :class:`Monitor` (progress, heartbeat, cancellation); the outcome string when it ends
    otherwise (failed, released at shutdown, aborted)."""
    samples = metrics.SAMPLES.labels(model=attempt.who.model, device=settings.torch_device())

    def progress(k: int) -> None:
        samples.inc(k)
        monitor.progress(k)

    db, job_id, token = attempt.db, attempt.job_id, attempt.token
    with Monitor(db, Job, job_id, token, settings.heartbeat_s, should_stop) as monitor:
        try:
            CACHE.capacity = settings.model_cache_size
            load_started = time.perf_counter()
            loaded = CACHE.get(job.ref, settings.torch_device())
            load_s = time.perf_counter() - load_started
        except Exception as exc:  # CheckpointError, OSError, CUDA errors
            return attempt.fail(f"model {job.ref.name!r} could not be loaded: {exc}")
        try:
            mode = get_mode(job.spec.mode)
            cert = mode.run(sampler_for(loaded, settings), job.x, job.spec, progress)
        except Aborted as exc:
            if exc.reason == "shutdown":
                with db.session() as s:
                    if state.release(s, Job, job_id, token):
                        events.job_changed(job_id, Status.QUEUED.value, attempt.who,
                                           reason="shutdown")  # fmt: skip
                return "released"
            log.info("job %s stopped: %s", job_id, exc.reason)
            return "aborted"
        except Exception as exc:  # the core's errors are the job's
            log.exception("job %s failed", job_id)
            return attempt.fail(f"{type(exc).__name__}: {exc}")
    return Sampled(cert, loaded, load_s, monitor.done)


def store_certificate(
    attempt: Attempt, body: dict[str, Any], signer: signing.Signer, done: int
) -> str:
    """Sign and store the one certificate in the transaction that moves the job to succeeded
    with ``done`` samples (nothing when the attempt is no longer the job's)."""
    db, job_id, token = attempt.db, attempt.job_id, attempt.token
    with db.session() as s:
        if not state.finish(s, Job, job_id, token, Status.SUCCEEDED, progress_done=done):
            s.rollback()
            log.info("job %s finished but no longer ours (cancelled or taken over)", job_id)
            return "aborted"
        stored = s.get(Job, job_id)
        assert stored is not None
        try:
            body = certificates.issue(s, stored, body, signer)
        except ValueError as exc:  # no canonical JSON form (e.g. an old seed beyond 2^53)
            s.rollback()
            return attempt.fail(f"cannot sign the certificate: {exc}")
        s.add(
            Certificate(
                job_id=job_id,
                prediction=body["prediction"],
                abstained=body["abstained"],
                radius=body["radius"],
                body=body,
            )
        )
        s.commit()
    run_s = time.perf_counter() - attempt.started
    events.job_changed(job_id, Status.SUCCEEDED.value, attempt.who, run_s=run_s)
    return Status.SUCCEEDED.value


def certificate_body(job: Claimed, sampled: Sampled, started: float) -> dict[str, Any]:
    """The stored certificate: every field of the core's plus what it was computed on."""
    cert, loaded = sampled.cert, sampled.loaded
    body = cert.to_dict()
    body.update(
        label=loaded.meta.class_name(cert.prediction),
        model=loaded.ref.name,
        checkpoint_sha256=loaded.ref.file_sha256,
        weights_sha256=loaded.meta.weights_sha256,
        recipe=recipe_name_of(loaded.meta.training),
        input_sha256=job.input_sha256,
        tensor_sha256=job.tensor_sha256,
        device=str(loaded.device),
    )
    body.update((k, v) for k, v in job.input_record.items() if k in RECORD_FIELDS)
    if loaded.meta.classes_source:
        body["label_source"] = loaded.meta.classes_source
    body["timings"] = {
        **{k: float(v) for k, v in cert.timings.items()},
        "queued_s": job.queued_s,
        "model_load_s": sampled.model_load_s,
        "run_s": time.perf_counter() - started,
    }
    return body


def _finish(
    db: Database,
    job_id: str,
    token: str,
    done: int,
    who: events.JobFacts,
    started: float,
    **values: Any,
) -> str:
    """Move the attempt's job to succeeded with ``values`` and no certificate (a replay)."""
    with db.session() as s:
        ok = state.finish(s, Job, job_id, token, Status.SUCCEEDED, progress_done=done, **values)
        s.commit()
    if not ok:
        log.info("job %s finished but no longer ours (cancelled or taken over)", job_id)
        return "aborted"
    events.job_changed(job_id, Status.SUCCEEDED.value, who, run_s=time.perf_counter() - started)
    return Status.SUCCEEDED.value


def _fail(
    db: Database, job_id: str, token: str, error: str, who: events.JobFacts, started: float
) -> str:
    with db.session() as s:
        ok = state.finish(s, Job, job_id, token, Status.FAILED, error=error[:4000])
        s.commit()
    if ok:
        run_s = time.perf_counter() - started
        events.job_changed(job_id, Status.FAILED.value, who, run_s=run_s, reason=error)
    return Status.FAILED.value if ok else "aborted"


def _report(db: Database, job_id: str, status: str, reason: str) -> None:
    """A state change made by the claim itself (the attempts cap): logged with the job's facts."""
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is not None:
            facts = events.JobFacts(job.mode, job.model_name)
            events.job_changed(job_id, status, facts, reason=reason)
