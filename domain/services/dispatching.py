"""Storing work and handing it to the workers: the use cases behind ``POST /certify``,
``POST /evaluations``, ``POST /jobs/{id}/replay`` and ``POST /admin/training``.

Each stores its rows first (``domain.services.submissions``, ``.evaluations``, ``.replays``,
or the training run built here), then gives the ids to a :class:`~domain.dispatch.Dispatcher`.
When the broker is down the work stays stored and queued (the sweep sends it once the broker is
back): :func:`send` raises :class:`~domain.errors.BrokerUnavailable` (503, ``Retry-After: 30``)
with ``job_id`` naming what was stored, which the HTTP answer shows as its ``id`` so the client
can poll it. :func:`certify` adds the ``Idempotency-Key`` protocol of
``domain.services.idempotency`` around a single submission (reserve, then complete or release).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from domain import registry
from domain.config import Settings
from domain.dispatch import Dispatcher, SentMarks
from domain.errors import BrokerUnavailable, ServiceError, bad_input, not_found
from domain.keys import Caller
from domain.services import evaluations, idempotency, replays
from domain.services.submissions import Params, submit, upload_record
from domain.store import state
from domain.store.tables import Certificate, Checkpoint, Evaluation, Job, Status, TrainingRun

# ---------------------------------------------------------------- handing ids to the workers


def send(dispatcher: Dispatcher, job_id: str, stored: str | None = None) -> None:
    """Hand job ``job_id`` to the workers. Raises ``BrokerUnavailable`` (503) with ``job_id`` set
    to ``stored`` (default: the job itself), the stored thing the client may poll."""
    try:
        dispatcher.certify(job_id)
    except BrokerUnavailable as exc:  # stored: the sweep sends it once the broker is back
        exc.job_id = stored or job_id
        raise


def send_all(session: Session, dispatcher: Dispatcher, job_ids: Iterable[str], stored: str) -> None:
    """:func:`send` each job in turn (a broker down stops at the first: the sweep sends the
    rest later), recording those sent (``enqueued_at``) whatever happened. Commits."""
    sent: list[str] = []
    try:
        for job_id in job_ids:
            send(dispatcher, job_id, stored)
            sent.append(job_id)
    finally:
        state.mark_enqueued_many(session, sent)


# ---------------------------------------------------------------- a client's jobs

# One query, built once: the job and its certificate, if any. Another client's job: not found.
_JOB_AND_CERTIFICATE = (
    select(Job, Certificate.body)
    .outerjoin(Certificate, Certificate.job_id == Job.id)
    .where(Job.id == bindparam("job_id"), Job.owner_id == bindparam("owner"))
)

UploadView = tuple[str, dict[str, Any]]  # (sha256 of an upload of the job's input, its record)


def owned_job(session: Session, owner_id: int, job_id: str) -> tuple[Job, dict[str, Any] | None]:
    """Job ``job_id`` of ``owner_id`` and its certificate body (None: none yet); 404 if the
    owner has no such job (another client's job included)."""
    row = session.execute(_JOB_AND_CERTIFICATE, {"job_id": job_id, "owner": owner_id}).first()
    if row is None:
        raise not_found(f"job {job_id!r}")
    return row[0], row[1]


def upload_view(session: Session, job: Job, sha256: str) -> UploadView | None:
    """The view of ``job`` for the upload whose bytes have ``sha256`` (None: the job's own)."""
    record = upload_record(session, job, sha256)
    return (sha256, record) if record is not None else None


# ---------------------------------------------------------------- POST /certify


class Outcome(enum.StrEnum):
    """What a submission did: its HTTP answer is 202, 200, and 200 marked as a replay."""

    QUEUED = "queued"  # a new job, just handed to the workers
    FOUND = "found"  # the identical request's earlier job (no new noise is drawn)
    REPLAYED = "replayed"  # the Idempotency-Key's earlier request's job


@dataclass(frozen=True)
class Submission:
    """The job a submission answers with, its certificate body (None: none yet, or just
    queued), and this upload's own view of it (None: the job's own input record)."""

    job: Job
    outcome: Outcome
    certificate: dict[str, Any] | None = None
    upload: UploadView | None = None


def _submit_and_send(
    session: Session,
    client: Caller,
    image: bytes,
    params: Params,
    settings: Settings,
    dispatcher: Dispatcher,
    marks: SentMarks,
) -> tuple[Job, bool]:
    """The stored job, and whether it was queued now (False: the identical earlier job)."""
    job, new = submit(session, client, image, params, settings)
    if new:
        send(dispatcher, job.id)  # BrokerUnavailable -> 503; the sweep sends it later
        marks.add(job.id)  # its enqueued_at, written in a batch within 50 ms
    return job, new


def _holding_key(
    session: Session, owner_id: int, key: str, make: Callable[[], tuple[Job, bool]]
) -> tuple[Job, bool]:
    """``make()`` under the reserved ``key``: the key then names the job made, also when the
    broker is down (the job is stored); a failure that made no job frees the key."""
    try:
        job, queued = make()
    except BrokerUnavailable as exc:  # the job is stored: the key now names it
        if exc.job_id:
            idempotency.complete(session, owner_id, key, exc.job_id)
        raise
    except BaseException:  # no job was made: a retry is processed afresh
        idempotency.release(session, owner_id, key)
        raise
    idempotency.complete(session, owner_id, key, job.id)
    return job, queued


def certify(
    session: Session,
    client: Caller,
    image: bytes,
    params: Params,
    settings: Settings,
    dispatcher: Dispatcher,
    marks: SentMarks,
    key: str | None = None,
) -> Submission:
    """Submit ``image`` (the upload's bytes) for certification and queue the job, or find the
    identical request's job. With an ``Idempotency-Key`` ``key``: the key's earlier identical
    request's job (``REPLAYED``); 422 for the key with another request, 409 while its first
    request is in flight. Raises ``BrokerUnavailable`` (503, naming the stored job) when the
    job could not be queued, and the submission's errors (400, 413, 415, 422, 429)."""
    sha256 = hashlib.sha256(image).hexdigest()

    def make() -> tuple[Job, bool]:
        return _submit_and_send(session, client, image, params, settings, dispatcher, marks)

    if key is None:
        job, queued = make()
    else:
        fp = idempotency.fingerprint(sha256, params)
        earlier = idempotency.reserve(session, client.id, key, fp, settings)
        if earlier is not None:
            found, body = owned_job(session, client.id, earlier)
            return Submission(found, Outcome.REPLAYED, body, upload_view(session, found, sha256))
        job, queued = _holding_key(session, client.id, key, make)
    # Another upload of the same pixels: the answer shows this upload's own record.
    upload = upload_view(session, job, sha256) if job.input_sha256 != sha256 else None
    if queued:  # just queued: nothing more to read back
        return Submission(job, Outcome.QUEUED, None, upload)
    session.refresh(job)
    body = session.scalar(select(Certificate.body).where(Certificate.job_id == job.id))
    return Submission(job, Outcome.FOUND, body, upload)


# ---------------------------------------------------------------- evaluations and replays


def evaluate(
    session: Session,
    client: Caller,
    request: evaluations.Request,
    settings: Settings,
    dispatcher: Dispatcher,
) -> Evaluation:
    """Store the evaluation and queue its images' jobs (those not already queued or finished).
    A broker down: ``BrokerUnavailable`` naming the evaluation (the sweep queues the rest)."""
    evaluation, job_ids = evaluations.submit(session, client, request, settings)
    send_all(session, dispatcher, job_ids, evaluation.id)
    return evaluation


def replay(
    session: Session, admin: Caller, job_id: str, settings: Settings, dispatcher: Dispatcher
) -> Job:
    """Store a replay of job ``job_id`` (``domain.services.replays``), queue it and return it
    as stored. 404, 409 as :func:`~domain.services.replays.submit_replay`; a broker down:
    ``BrokerUnavailable`` naming the replay."""
    job = replays.submit_replay(session, admin, job_id, settings)
    send(dispatcher, job.id)
    state.mark_enqueued(session, Job, job.id)
    session.refresh(job)
    return job


# ---------------------------------------------------------------- training runs


@dataclass(frozen=True)
class Training:
    """A training run as requested (``POST /admin/training``'s body)."""

    kind: str  # "pretrain" or "finetune"
    dataset: str  # a built-in dataset or a folder inside the server's dataset folder
    name: str  # the registry name of the resulting checkpoint
    sigma: float = 0.25
    init: str | None = None  # fine-tuning: a registered pre-trained model, or "none"
    params: dict[str, Any] = field(default_factory=dict)  # the pipeline's hyper-parameters
    activate: bool = True
    default: bool = False


def _training_params(session: Session, request: Training, settings: Settings) -> dict[str, Any]:
    """The run's stored parameters: the hyper-parameters checked, ``val_data`` resolved like
    the dataset, ``sigma`` and ``init`` added. 422 for an invalid one."""
    from models.training.params import check_training_params

    params: dict[str, Any] = dict(request.params)
    val_data = params.pop("val_data", None)  # a dataset like `dataset`, resolved the same way
    if request.default and not request.activate:
        raise bad_input("default needs activate: a deactivated model cannot be a default")
    if request.default and request.kind != "finetune":
        raise bad_input("default is for fine-tuning runs: a pre-trained model serves no requests")
    if request.init is not None and request.init != "none":
        init = session.scalar(select(Checkpoint).where(Checkpoint.name == request.init))
        if init is None:
            raise bad_input(f"unknown model {request.init!r} for init")
    try:
        check_training_params(request.kind, params, sigma=request.sigma, init=request.init)
    except ValueError as exc:
        raise bad_input(str(exc)) from exc
    if isinstance(val_data, str):
        params["val_data"] = registry.dataset(settings.datasets, val_data)
    elif val_data is not None:
        raise bad_input(f"val_data must be a dataset name like dataset, got {val_data!r}")
    params["sigma"] = request.sigma
    if request.init:
        params["init"] = request.init
    return params


def launch_training(
    session: Session, admin: Caller, request: Training, settings: Settings, dispatcher: Dispatcher
) -> TrainingRun:
    """Store the training run (queued, owned by ``admin``), hand it to the workers and return
    it as stored. 409 if the result name is taken; 422 for an unknown dataset, init model or
    hyper-parameter; a broker down: ``BrokerUnavailable`` (the run stays queued)."""
    registry.check_name(request.name)
    if session.scalar(select(Checkpoint.id).where(Checkpoint.name == request.name)) is not None:
        raise ServiceError(409, f"a model named {request.name!r} is already registered")
    dataset = registry.dataset(settings.datasets, request.dataset)
    params = _training_params(session, request, settings)
    run = TrainingRun(
        owner_id=admin.id,
        kind=request.kind,
        dataset=dataset,
        params=params,
        result_name=request.name,
        activate=request.activate,
        make_default=request.default,
        status=Status.QUEUED.value,
        progress_done=0,
        progress_total=0,
        attempts=0,
        metrics={},
    )
    session.add(run)
    session.commit()
    dispatcher.train(run.id)
    state.mark_enqueued(session, TrainingRun, run.id)
    session.refresh(run)
    return run
