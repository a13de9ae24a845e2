"""THE job code: run one certification job by id. Shared by the Celery task and the embedded
in-process runner.

1. Claim the job by compare-and-set (queued, or running with a dead worker; attempts capped).
2. Load its model (cached per process) and its stored, already preprocessed input tensor.
3. Run ``models.smoothing.certify`` / ``predict`` (the one core) with the job's seed, writing
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
from typing import Any

import torch
from sqlalchemy import select

from domain import certificates, events, metrics
from domain.config import Settings, get_settings
from domain.services import replays
from domain.store import state
from domain.store.db import get_database
from domain.store.tables import Certificate, Checkpoint, Job, JobInput, Status
from domain.trust import signing
from models.data import tensor_from_bytes
from models.training.recipes import recipe_name_of
from worker.model_cache import CACHE, LoadedModel, ModelRef
from worker.monitor import Aborted, Monitor

log = logging.getLogger("dmae.worker")
RECORD_FIELDS = ("original_size", "scale", "preprocessing", "warnings")


def sampler_for(loaded: LoadedModel, settings: Settings) -> Any:
    """The Sampler that turns a job's noisy copies into counts on ``loaded``'s model.

    The process's batching engine (worker/engine.py): concurrent jobs on the same model share
    batches, each with its own seeded noise, so a job's counts equal the CLI's for its seed.
    Precision as in the CLI: bf16 autocast on CUDA, float32 on CPU; noise always float32.
    """
    from worker.engine import shared_engine

    engine = shared_engine(loaded.device, batch_size=settings.batch_size or None)
    engine.register(loaded.engine_key, loaded.model, loaded.meta.num_classes)
    return engine.sampler(loaded.engine_key)


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

    started = time.perf_counter()
    who = events.UNKNOWN
    try:
        with db.session() as s:
            job = s.get(Job, job_id)
            inp = s.get(JobInput, job_id)
            ckpt = s.get(Checkpoint, job.checkpoint_id) if job is not None else None
            if job is None or inp is None or ckpt is None:
                raise LookupError("the job's input or model record is missing")
            who = events.JobFacts(job.mode, job.model_name)
            wait = (job.started_at - job.created_at).total_seconds() if job.started_at else None
            events.job_changed(job_id, Status.RUNNING.value, who, queue_wait_s=wait)
            ref = ModelRef.of(ckpt)
            params = dict(
                mode=job.mode,
                sigma=job.sigma,
                alpha=job.alpha,
                n0=job.n0,
                n=job.n,
                seed=job.seed,
                target_radius=job.target_radius,
                time_budget_s=job.time_budget_s,
                input_sha256=job.input_sha256,
                tensor_sha256=job.tensor_sha256,
                input_record=dict(job.input_record or {}),
                created_at=job.created_at,
                started_at=job.started_at,
            )
            x = tensor_from_bytes(inp.data, inp.shape)
            original: dict[str, Any] | None = None
            if job.replay_of is not None:
                original = s.scalar(
                    select(Certificate.body).where(Certificate.job_id == job.replay_of)
                )
                if original is None:
                    raise LookupError(f"the replayed job {job.replay_of}'s certificate is gone")
                # A budget stop depends on the clock: the replay draws the same samples.
                params["time_budget_s"] = None
                if original.get("n_used") not in (None, job.n):
                    params["stop_after"] = int(original["n_used"])
            replay_of = job.replay_of
    except Exception as exc:  # any failure here is the job's, reported on it
        return _fail(db, job_id, token, f"could not read the job: {exc}", who, started)
    try:
        signer = signing.signer(settings) if original is None else None
    except signing.SigningError as exc:  # no certificate without a signature
        return _fail(db, job_id, token, f"cannot sign certificates: {exc}", who, started)

    def progress(k: int) -> None:
        samples.inc(k)
        monitor.progress(k)

    samples = metrics.SAMPLES.labels(model=who.model, device=settings.torch_device())
    with Monitor(db, Job, job_id, token, settings.heartbeat_s, should_stop) as monitor:
        try:
            CACHE.capacity = settings.model_cache_size
            load_started = time.perf_counter()
            loaded = CACHE.get(ref, settings.torch_device())
            params["model_load_s"] = time.perf_counter() - load_started
        except Exception as exc:  # CheckpointError, OSError, CUDA errors
            error = f"model {ref.name!r} could not be loaded: {exc}"
            return _fail(db, job_id, token, error, who, started)
        try:
            cert = _run_core(loaded, x, params, settings, progress)
        except Aborted as exc:
            if exc.reason == "shutdown":
                with db.session() as s:
                    if state.release(s, Job, job_id, token):
                        events.job_changed(job_id, Status.QUEUED.value, who, reason="shutdown")
                return "released"
            log.info("job %s stopped: %s", job_id, exc.reason)
            return "aborted"
        except Exception as exc:  # the core's errors are the job's
            log.exception("job %s failed", job_id)
            return _fail(db, job_id, token, f"{type(exc).__name__}: {exc}", who, started)

    if original is not None:
        found = replays.compare(original, cert.to_dict(), str(loaded.device), replay_of=replay_of)
        return _finish(db, job_id, token, monitor.done, who, started, replay_result=found)
    body = certificate_body(cert, loaded, params, started)
    with db.session() as s:
        if not state.finish(s, Job, job_id, token, Status.SUCCEEDED, progress_done=monitor.done):
            s.rollback()
            log.info("job %s finished but no longer ours (cancelled or taken over)", job_id)
            return "aborted"
        stored = s.get(Job, job_id)
        assert stored is not None and signer is not None
        try:
            body = certificates.issue(s, stored, body, signer)
        except ValueError as exc:  # no canonical JSON form (e.g. an old seed beyond 2^53)
            s.rollback()
            return _fail(db, job_id, token, f"cannot sign the certificate: {exc}", who, started)
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
    events.job_changed(job_id, Status.SUCCEEDED.value, who, run_s=time.perf_counter() - started)
    return Status.SUCCEEDED.value


def _run_core(
    loaded: LoadedModel,
    x: torch.Tensor,
    p: dict[str, Any],
    settings: Settings,
    progress: Callable[[int], None],
) -> Any:
    from models.smoothing import certify, decide, predict

    sampler = sampler_for(loaded, settings)
    common = dict(sampler=sampler, x=x, sigma=p["sigma"], alpha=p["alpha"], seed=p["seed"])
    if p["mode"] == "predict":
        return predict(**common, n=p["n"], progress=progress)
    if p["mode"] == "decide":
        return decide(**common, target_radius=p["target_radius"], n0=p["n0"], n=p["n"],
                      progress=progress)  # fmt: skip
    return certify(
        **common,
        n0=p["n0"],
        n=p["n"],
        top2=p["mode"] == "certify_top2",
        time_budget_s=p.get("time_budget_s"),
        stop_after=p.get("stop_after"),
        progress=progress,
    )


def certificate_body(
    cert: Any, loaded: LoadedModel, p: dict[str, Any], started: float
) -> dict[str, Any]:
    """The stored certificate: every field of the core's plus what it was computed on."""
    body = cert.to_dict()
    queued_s = (p["started_at"] - p["created_at"]).total_seconds() if p["started_at"] else 0.0
    body.update(
        label=loaded.meta.class_name(cert.prediction),
        model=loaded.ref.name,
        checkpoint_sha256=loaded.ref.file_sha256,
        weights_sha256=loaded.meta.weights_sha256,
        recipe=recipe_name_of(loaded.meta.training),
        input_sha256=p["input_sha256"],
        tensor_sha256=p["tensor_sha256"],
        device=str(loaded.device),
    )
    record = p["input_record"]  # original_size, scale, preprocessing, warnings (may be empty)
    body.update((k, v) for k, v in record.items() if k in RECORD_FIELDS)
    if loaded.meta.classes_source:
        body["label_source"] = loaded.meta.classes_source
    body["timings"] = {
        **{k: float(v) for k, v in cert.timings.items()},
        "queued_s": max(queued_s, 0.0),
        "model_load_s": p["model_load_s"],
        "run_s": time.perf_counter() - started,
    }
    return body


def _finish(
    db: Any, job_id: str, token: str, done: int, who: events.JobFacts, started: float, **values: Any
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
    db: Any, job_id: str, token: str, error: str, who: events.JobFacts, started: float
) -> str:
    with db.session() as s:
        ok = state.finish(s, Job, job_id, token, Status.FAILED, error=error[:4000])
        s.commit()
    if ok:
        run_s = time.perf_counter() - started
        events.job_changed(job_id, Status.FAILED.value, who, run_s=run_s, reason=error)
    return Status.FAILED.value if ok else "aborted"


def _report(db: Any, job_id: str, status: str, reason: str) -> None:
    """A state change made by the claim itself (the attempts cap): logged with the job's facts."""
    with db.session() as s:
        job = s.get(Job, job_id)
        if job is not None:
            facts = events.JobFacts(job.mode, job.model_name)
            events.job_changed(job_id, status, facts, reason=reason)
