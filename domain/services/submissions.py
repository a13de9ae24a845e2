"""Turning a POST /certify into a stored, queued job, exactly once per request.

A job is pre-committed: its seed is fixed at submission (derived from the input, the model, the
parameters and a server secret, or, where allowed, the client's), and (client, input, model,
parameters, seed) is unique.
The input is identified by the sha256 of its preprocessed float32 tensor (``tensor_sha256``),
not of the uploaded bytes: the same pixels re-encoded are the same job. Submitting the same
thing again returns the stored job and, once it has succeeded, its certificate: never a
re-roll. Only a job that produced nothing (failed or cancelled) is queued again, under the
same seed.

Each upload keeps its own record: a re-upload of pixels already certified, in other bytes (the
first frame of an animated WebP, then that frame as a PNG), reaches the one job of that tensor,
but its preprocessing steps and warnings are its own (:func:`note_upload`, stored in
``job_uploads``), and the answer to it, ``GET /jobs/{id}?upload=<its sha256>`` and its
evaluation rows show them (:func:`upload_record`).

Admission control: a client may have at most ``max_active_jobs`` jobs queued or running (jobs
of an evaluation excepted: those are admitted per evaluation); a submission that would add one
more gets 429 with ``Retry-After``. The count runs after the insert, under a lock on the
client's key row (:func:`admit`), so concurrent submissions cannot overshoot.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import BigInteger, Table, bindparam, exists, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from domain import events, registry
from domain.config import Settings
from domain.errors import ADMISSION_RETRY_S, ServiceError, bad_input
from domain.intake.images import decode_image
from domain.keys import Caller, lock_key
from domain.services.evaluation_cap import admit as admit_evaluations
from domain.store.db import utcnow
from domain.store.state import rowcount
from domain.store.tables import (
    ACTIVE_SQL,
    Evaluation,
    EvaluationItem,
    Job,
    JobInput,
    JobUpload,
    Status,
    new_id,
)
from domain.trust import signing
from models.data import tensor_bytes
from models.images import Preprocessed
from models.modes import DEFAULT as DEFAULT_MODE
from models.modes import MODES, Mode, RunSpec, get_mode
from models.smoothing import validate, validate_budget

SEED_BITS = 53  # seeds stay exact in JSON numbers (JavaScript clients, RFC 8785 signatures)
SEED_DERIVED, SEED_CLIENT = "derived", "client"


@dataclass
class Params:
    """The form fields of POST /certify."""

    mode: str = DEFAULT_MODE
    sigma: float | None = None
    alpha: float = 0.001
    n0: int | None = None  # None: the mode's default (selection_samples)
    n: int = 10_000
    seed: int | None = None
    model: str | None = None
    target_radius: float | None = None  # deciding modes: "is x certified at this radius?"
    time_budget_s: float | None = None  # budgeted modes: stop sampling after this long

    def selection_samples(self) -> int:
        """n0 as the job stores it: the mode's (``models.modes.Mode.selection_samples``: 0
        without selection, else the given value or the mode's default)."""
        return get_mode(self.mode).selection_samples(self.n0)

    def extra(self) -> dict[str, float]:
        """The parameters beyond CERTIFY's that make a request distinct (none when unset, so
        the seeds and keys of requests without them are unchanged)."""
        out = {"target_radius": self.target_radius, "time_budget_s": self.time_budget_s}
        return {k: float(v) for k, v in out.items() if v is not None}

    def spec(self, sigma: float, seed: int) -> RunSpec:
        """The run these fields ask for, on ``sigma`` with ``seed``: what the job stores."""
        return RunSpec(
            mode=self.mode, sigma=sigma, alpha=float(self.alpha), n0=self.selection_samples(),
            n=self.n, seed=seed, target_radius=self.target_radius,
            time_budget_s=self.time_budget_s,
        )  # fmt: skip


def check_params(p: Params, settings: Settings) -> None:
    """422 with the reason for any parameter no certificate can use or the service refuses."""
    try:
        mode = get_mode(p.mode)
    except ValueError as exc:
        raise bad_input(str(exc)) from exc
    if not 1 <= p.n <= settings.n_max:
        raise bad_input(f"n must lie in [1, {settings.n_max}], got {p.n}")
    least = mode.least_n0  # 0: the selection merges into the test (decide)
    if mode.uses_n0 and not least <= p.selection_samples() <= settings.n0_max:
        raise bad_input(f"n0 must lie in [{least}, {settings.n0_max}], got {p.n0}")
    if p.seed is not None and not 0 <= p.seed < 2**SEED_BITS:
        raise bad_input(f"seed must lie in [0, 2^{SEED_BITS}), got {p.seed}")
    _check_mode_fields(p, mode)
    try:  # the core's checks of sigma (when given), alpha and n, with its messages
        validate(p.sigma if p.sigma is not None else 1.0, p.alpha, p.n)
        validate_budget(p.time_budget_s)
        mode.check_samples(p.n, p.alpha)  # n too small for alpha (decide: in resolve())
    except ValueError as exc:
        raise bad_input(str(exc)) from exc


def _check_mode_fields(p: Params, mode: Mode) -> None:
    """422 when target_radius or time_budget_s is missing where the mode needs it or given
    where it takes none."""
    deciding = [m.name for m in MODES.values() if m.decides]
    if mode.decides and p.target_radius is None:
        raise bad_input(f"mode={mode.name} needs target_radius (the radius to decide about)")
    if not mode.decides and p.target_radius is not None:
        raise bad_input(f"target_radius is for mode={' or '.join(deciding)} only, not {p.mode}")
    if p.time_budget_s is not None and not mode.takes_time_budget:
        budgeted = [m.name for m in MODES.values() if m.takes_time_budget]
        raise bad_input(f"time_budget_s is for mode={' or '.join(budgeted)}, not {p.mode}")


def _canonical(fields: dict[str, object]) -> bytes:
    return json.dumps(fields, sort_keys=True).encode()


def _digest(fields: dict[str, object]) -> bytes:
    return hashlib.sha256(_canonical(fields)).digest()


def derive_seed(
    tensor_sha256: str,
    checkpoint_sha256: str,
    mode: str,
    sigma: float,
    alpha: float,
    n0: int,
    n: int,
    *,
    secret: bytes,
    extra: dict[str, float] | None = None,
) -> int:
    """The default seed: HMAC-SHA256 under the server's ``secret`` of what is certified (the
    first 53 bits), so a submission always maps to the same pre-committed run, yet nobody
    without the secret can predict a run's noise before submitting (no offline grinding)."""
    fields = dict(
        tensor=tensor_sha256,
        checkpoint=checkpoint_sha256,
        mode=mode,
        sigma=sigma,
        alpha=alpha,
        n0=n0,
        n=n,
        **(extra or {}),
    )
    mac = hmac.new(secret, _canonical(fields), hashlib.sha256).digest()
    return int.from_bytes(mac[:8], "big") >> (64 - SEED_BITS)


def request_key(job: Job, checkpoint_sha256: str) -> str:
    fields = dict(
        tensor=job.tensor_sha256,
        checkpoint=checkpoint_sha256,
        model=job.model_name,
        mode=job.mode,
        sigma=job.sigma,
        alpha=job.alpha,
        n0=job.n0,
        n=job.n,
        seed=job.seed,
    )
    if job.target_radius is not None:
        fields["target_radius"] = job.target_radius
    if job.time_budget_s is not None:
        fields["time_budget_s"] = job.time_budget_s
    return _digest(fields).hex()


def choose_seed(given: int | None, derived: int, settings: Settings) -> tuple[int, str]:
    """(seed, seed_source): the derived seed, or the client's where the settings allow it.

    A client's seed equal to the derived one is the same pre-committed run (``derived``). Any
    other is refused with 422 unless ``DMAE_ALLOW_CLIENT_SEED`` (default: only embedded)."""
    if given is None or given == derived:
        return derived, SEED_DERIVED
    if not settings.client_seeds_allowed:
        raise bad_input(
            "client-chosen seeds are not accepted by this service: a seed known before sampling "
            "lets a client predict the noise and submit only inputs that come out well. Leave "
            "seed out (the service derives one from a secret and reveals it in the "
            "certificate), or ask the operator to set DMAE_ALLOW_CLIENT_SEED=true"
        )
    return given, SEED_CLIENT


@dataclass(frozen=True)
class Target:
    """What a submission runs on: the chosen model and the sigma (given, or the model's)."""

    ckpt: registry.Choice
    sigma: float


def resolve(session: Session, p: Params, settings: Settings) -> Target:
    """Check the parameters and choose the model: 422 with the reason for anything unusable."""
    check_params(p, settings)
    ckpt = registry.choose(session, p.sigma, p.model, settings.registry_cache_s)
    sigma = p.sigma if p.sigma is not None else ckpt.sigma
    if sigma is None:
        raise bad_input(f"model {ckpt.name!r} records no training sigma: give sigma")
    try:  # a deciding mode: the target is reachable, and n could certify it
        mode = get_mode(p.mode)
        mode.check_reachable(p.n, p.alpha, sigma, p.selection_samples(), p.target_radius)
    except ValueError as exc:
        raise bad_input(str(exc)) from exc
    return Target(ckpt, float(sigma))


def new_job(
    owner_id: int,
    inp: Preprocessed,
    input_sha256: str,
    p: Params,
    target: Target,
    settings: Settings,
    secret: bytes,
) -> tuple[Job, JobInput]:
    """The queued job (not yet stored) that certifies ``inp`` (a preprocessed input; its bytes'
    sha256 is ``input_sha256``) with ``p`` on ``target``: its pre-committed seed (derived from
    the tensor, checkpoint and parameters under ``secret``, or the client's where allowed) and
    its no-re-roll ``request_key``. The one definition of a job's identity, for single
    submissions and evaluations alike."""
    ckpt, sigma = target.ckpt, target.sigma
    n0 = p.selection_samples()
    tensor_hash = inp.tensor_sha256
    derived = derive_seed(
        tensor_hash, ckpt.file_sha256, p.mode, sigma, p.alpha, n0, p.n,
        secret=secret, extra=p.extra(),
    )  # fmt: skip
    seed, source = choose_seed(p.seed, derived, settings)
    spec = p.spec(sigma, seed)  # stored as the job's columns; the worker reads it (Job.spec)
    job = Job(
        id=new_id(),
        owner_id=owner_id,
        mode=spec.mode,
        checkpoint_id=ckpt.id,
        model_name=ckpt.name,
        sigma=spec.sigma,
        alpha=spec.alpha,
        n0=spec.n0,
        n=spec.n,
        seed=spec.seed,
        seed_source=source,
        input_sha256=input_sha256,
        tensor_sha256=tensor_hash,
        input_record=inp.record(),
        input_shape=list(inp.tensor.shape),
        status=Status.QUEUED.value,
        progress_done=0,
        progress_total=spec.n0 + spec.n,
        attempts=0,
        target_radius=spec.target_radius,
        time_budget_s=spec.time_budget_s,
        created_at=utcnow(),
    )
    job.request_key = request_key(job, ckpt.file_sha256)
    stored = JobInput(job_id=job.id, shape=list(inp.tensor.shape), data=tensor_bytes(inp.tensor))
    return job, stored


def submit(
    session: Session, client: Caller, image: bytes, p: Params, settings: Settings
) -> tuple[Job, bool]:
    """Store the job (or find the identical one); returns (job, whether it must be sent to the
    workers now)."""
    target = resolve(session, p, settings)
    decoded = decode_image(image, target.ckpt.input_size, settings.max_image_pixels)
    secret = signing.seed_secret(settings)
    job, stored = new_job(client.id, decoded.input, decoded.sha256, p, target, settings, secret)

    # The unique (owner, request key) decides whether this is new: no look-up first, since a
    # new submission is the common case and an identical one costs one rolled-back insert.
    try:
        insert_rows(session, job, stored)
    except IntegrityError:  # the identical request exists (earlier, or racing in right now)
        session.rollback()
        existing = find(session, client.id, job.request_key)
        if existing is None:
            raise
        if note_upload(session, existing, decoded.sha256, decoded.input.record()):
            session.commit()
        return _reuse(session, existing, settings)
    admit(session, client.id, settings)
    session.commit()
    events.job_changed(job.id, Status.QUEUED.value, events.JobFacts(job.mode, job.model_name))
    return job, True


_JOBS_TABLE = cast(Table, Job.__table__)
_INSERT_JOB = insert(_JOBS_TABLE)
_INSERT_INPUT = insert(cast(Table, JobInput.__table__))
_JOBS, _ITEMS = _JOBS_TABLE.c, EvaluationItem.__table__.c
_EVALUATIONS = Evaluation.__table__.c
# The key's queued and running jobs outside evaluations in progress, counted up to a limit (the
# cap + 1 is enough to refuse), through the partial index ix_jobs_owner_active. Its predicate is
# written out, not bound: a plan PostgreSQL caches for any parameter values could not use the
# index. A job of an evaluation that is not cancelled counts against the evaluation cap instead;
# one whose evaluations were all cancelled, queued again by a single submission, counts here.
_ACTIVE = select(func.count()).select_from(
    select(_JOBS.id)
    .where(
        _JOBS.owner_id == bindparam("owner"),
        text(ACTIVE_SQL),
        ~exists().where(
            _ITEMS.job_id == _JOBS.id,
            _EVALUATIONS.id == _ITEMS.evaluation_id,
            _EVALUATIONS.cancelled_at.is_(None),
        ),
    )
    .limit(bindparam("limit", type_=BigInteger))
    .subquery()
)


def insert_rows(session: Session, job: Job, stored: JobInput) -> None:
    """INSERT a new job and its input in the session's transaction, as two Core statements
    built once (the objects stay outside the session: a unit-of-work flush cost about as much
    CPU as the rest of the submission). The values are the attributes set on the objects; IDs
    and ``created_at`` are set by :func:`new_job`. IntegrityError if the request key exists."""
    conn = session.connection()
    for statement, row in ((_INSERT_JOB, job), (_INSERT_INPUT, stored)):
        conn.execute(statement, {k: v for k, v in vars(row).items() if not k.startswith("_sa_")})


def admit(session: Session, owner_id: int, settings: Settings) -> None:
    """Call after writing the job that makes one more active (not yet committed): rolls back and
    raises 429 when the client now has more than ``max_active_jobs`` queued or running. Jobs
    that belong to an evaluation in progress (not cancelled) are not counted: evaluations have
    their own admission (``domain.services.evaluations``).

    The count runs under a lock on the client's key row (Postgres: ``FOR NO KEY UPDATE``, which
    the job rows' foreign-key locks do not conflict with; SQLite: the write lock the insert
    already holds), so concurrent submissions of one client are counted one after another, and
    the lock is held only from here to the caller's commit. The count is its own statement, after
    the lock's: under READ COMMITTED only a statement that starts after the lock is granted sees
    the jobs the lock's previous holder committed."""
    cap = settings.max_active_jobs
    if cap <= 0:
        return
    lock_key(session, owner_id)
    conn = session.connection()
    # Counting stops at cap + 1, which is all a refusal needs: a long backlog costs no more
    # (so a refusal knows "cap or more", not how many).
    limit = min(cap, 2**62) + 1  # within a bigint, the type of the bound LIMIT
    active = conn.execute(_ACTIVE, {"owner": owner_id, "limit": limit}).scalar()
    if (active or 0) > cap:
        session.rollback()
        raise ServiceError(
            429,
            f"too many jobs in progress: this API key already has {cap} or more queued or "
            f"running (at most {cap}); wait for some to finish",
            {"Retry-After": str(ADMISSION_RETRY_S)},
        )


def note_upload(session: Session, job: Job, input_sha256: str, record: dict[str, Any]) -> bool:
    """Keep the record of an upload (its bytes' sha256 and preprocessing record) that reached
    the existing ``job``; does not commit. Nothing for the job's own bytes (the job holds their
    record): False. One row per job and bytes, the latest record kept (an insert that races
    with an identical one updates it)."""
    if input_sha256 == job.input_sha256:
        return False
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(JobUpload).values(
        job_id=job.id, input_sha256=input_sha256, input_record=record, created_at=utcnow()
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["job_id", "input_sha256"],
            set_={"input_record": stmt.excluded.input_record},
        )
    )
    return True


def upload_record(session: Session, job: Job, input_sha256: str) -> dict[str, Any] | None:
    """The record of the upload of ``job``'s input whose bytes have ``input_sha256``: None for
    the job's own bytes (``job.input_record``) or bytes that never reached it."""
    if input_sha256 == job.input_sha256:
        return None
    found = session.scalar(
        select(JobUpload.input_record).where(
            JobUpload.job_id == job.id, JobUpload.input_sha256 == input_sha256
        )
    )
    return dict(found) if found is not None else None


def find(session: Session, owner_id: int, key: str) -> Job | None:
    """The client's job with this request key (the identical earlier request), if any."""
    return session.scalar(select(Job).where(Job.owner_id == owner_id, Job.request_key == key))


def requeue(session: Session, job: Job) -> bool:
    """Queue an identical earlier job again if it produced nothing (failed or cancelled), under
    its seed; does not commit. True when it was re-queued (it is active again)."""
    if job.status not in (Status.FAILED.value, Status.CANCELLED.value):
        return False
    requeued = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_((Status.FAILED.value, Status.CANCELLED.value)))
        .values(
            status=Status.QUEUED.value,
            attempts=0,
            error=None,
            progress_done=0,
            run_token=None,
            enqueued_at=None,
            started_at=None,
            heartbeat_at=None,
            finished_at=None,
        )
    )
    return bool(rowcount(requeued))


def _reuse(session: Session, job: Job, settings: Settings) -> tuple[Job, bool]:
    """An identical earlier job: as it is, or queued again if it produced nothing."""
    if job.status not in (Status.FAILED.value, Status.CANCELLED.value):
        return job, False
    if requeue(session, job):
        admit(session, job.owner_id, settings)
        # A job of an evaluation that is not cancelled puts that evaluation back in progress:
        # the evaluation cap applies too.
        admit_evaluations(session, job.owner_id, settings)
    session.commit()
    session.refresh(job)
    queued = job.status == Status.QUEUED.value
    if queued:
        facts = events.JobFacts(job.mode, job.model_name)
        events.job_changed(job.id, Status.QUEUED.value, facts, reason="submitted again")
    return job, queued
