"""SQLAlchemy models: API keys, registered checkpoints, jobs, their inputs and certificates,
training runs. Postgres is the source of truth; every state change of a job or run is a
compare-and-set ``UPDATE`` (see ``domain/store/state.py``).
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from domain.store.db import utcnow
from models.modes import RunSpec

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, dt.datetime: DateTime()}


class Status(enum.StrEnum):
    """Life cycle of a job or training run; the last three are terminal."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = (Status.QUEUED.value, Status.RUNNING.value)
TERMINAL_STATUSES = (Status.SUCCEEDED.value, Status.FAILED.value, Status.CANCELLED.value)
# SQL for "the job is queued or running" (from ACTIVE_STATUSES): the predicate of the partial index
# on jobs the admission count reads (migration 0007, which builds it, spells it out the same way).
ACTIVE_SQL = f"status IN ({', '.join(repr(s) for s in ACTIVE_STATUSES)})"


def new_id() -> str:
    return str(uuid.uuid4())


class ApiKey(Base):
    """A client. Only the sha256 of the token is stored; the token is shown once at creation."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    key_prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Checkpoint(Base):
    """A registered model: where its file is, what it is, and whether it serves requests."""

    __tablename__ = "checkpoints"
    # One default per sigma: the model a request with that sigma and no model name runs on.
    __table_args__ = (
        Index(
            "ux_checkpoints_default_sigma",
            "sigma",
            unique=True,
            postgresql_where=text("is_default"),
            sqlite_where=text("is_default"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    location: Mapped[str] = mapped_column(String(1000))  # "bundled:<name>" or an absolute path
    file_sha256: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64), default="")
    format: Mapped[str] = mapped_column(String(20))  # "project" or "official"
    kind: Mapped[str] = mapped_column(String(20))  # "classifier" or "pretrain"
    sigma: Mapped[float | None] = mapped_column(Float, default=None)
    num_classes: Mapped[int] = mapped_column(Integer, default=0)
    classes: Mapped[list[Any]] = mapped_column(default=list)
    input_size: Mapped[int] = mapped_column(Integer)
    arch: Mapped[dict[str, Any]] = mapped_column(default=dict)
    licence: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(Text, default="")
    # How the model was trained (e.g. dmae+consistency, scratch+gaussian); null when unknown.
    recipe: Mapped[str | None] = mapped_column(String(64), default=None)
    import_options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Set only deliberately (domain.registry.set_default), never by registering or training.
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    created_by: Mapped[int | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL"), default=None
    )


class RunState:
    """Columns shared by jobs and training runs: status, progress, attempts, heartbeat."""

    status: Mapped[str] = mapped_column(String(16), default=Status.QUEUED.value, index=True)
    progress_done: Mapped[int] = mapped_column(BigInteger, default=0)
    progress_total: Mapped[int] = mapped_column(BigInteger, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    run_token: Mapped[str | None] = mapped_column(String(32), default=None)
    worker: Mapped[str | None] = mapped_column(String(200), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    started_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    finished_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class Job(RunState, Base):
    """One PREDICT/CERTIFY request. (owner, request_key) is unique: no re-rolls.

    A replay (``replay_of`` set) re-runs another job's seed and parameters to check its counts;
    it stores ``replay_result`` instead of a certificate."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "request_key", name="uq_jobs_owner_request"),
        Index("ix_jobs_owner_created", "owner_id", "created_at"),
        Index("ix_jobs_owner_tensor", "owner_id", "tensor_sha256"),  # a certificate's prior_runs
        # The admission count of every submission: a key's queued and running jobs only, however
        # long its history and however many jobs other keys have waiting.
        Index(
            "ix_jobs_owner_active",
            "owner_id",
            postgresql_where=text(ACTIVE_SQL),
            sqlite_where=text(ACTIVE_SQL),
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    request_key: Mapped[str] = mapped_column(String(64))
    mode: Mapped[str] = mapped_column(String(20))
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"))
    model_name: Mapped[str] = mapped_column(String(200))
    sigma: Mapped[float] = mapped_column(Float)
    alpha: Mapped[float] = mapped_column(Float)
    n0: Mapped[int] = mapped_column(Integer)
    n: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    input_sha256: Mapped[str] = mapped_column(String(64))  # of the uploaded bytes
    # The input's identity: sha256 of the preprocessed float32 tensor (no-re-roll key, seed).
    tensor_sha256: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # What preprocessing did: original_size, scale, preprocessing (steps), warnings.
    input_record: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=text("'{}'"))
    input_shape: Mapped[list[Any]] = mapped_column(default=list)
    # "derived" (HMAC of the input and parameters under the server secret) or "client";
    # "" for jobs made before it was recorded.
    seed_source: Mapped[str] = mapped_column(String(8), default="", server_default="")
    replay_of: Mapped[str | None] = mapped_column(String(36), default=None, index=True)
    replay_result: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    # decide jobs: the radius tested; certify jobs: an optional time budget (s). Else null.
    target_radius: Mapped[float | None] = mapped_column(Float, default=None)
    time_budget_s: Mapped[float | None] = mapped_column(Float, default=None)

    def spec(self) -> RunSpec:
        """The run's parameters as submission stored them (``models.modes.RunSpec``)."""
        return RunSpec(
            mode=self.mode, sigma=self.sigma, alpha=self.alpha, n0=self.n0, n=self.n,
            seed=self.seed, target_radius=self.target_radius, time_budget_s=self.time_budget_s,
        )  # fmt: skip


class JobInput(Base):
    """The preprocessed float32 tensor a job certifies (workers never decode uploads)."""

    __tablename__ = "job_inputs"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    shape: Mapped[list[Any]] = mapped_column()
    data: Mapped[bytes] = mapped_column(LargeBinary)


class JobUpload(Base):
    """The record of an upload that reached an existing job with other bytes (same tensor):
    its own preprocessing steps and warnings (``jobs.input_record`` is the first upload's)."""

    __tablename__ = "job_uploads"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    input_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)  # the upload's bytes
    input_record: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Certificate(Base):
    """The one result of a job (unique per job: a redelivered task cannot add a second)."""

    __tablename__ = "certificates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    prediction: Mapped[int | None] = mapped_column(Integer, default=None)
    abstained: Mapped[bool] = mapped_column(Boolean)
    radius: Mapped[float] = mapped_column(Float)
    body: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class TrainingRun(RunState, Base):
    """A pre-training or fine-tuning run executed by a worker; registers its checkpoint."""

    __tablename__ = "training_runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[int | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL"), default=None
    )
    kind: Mapped[str] = mapped_column(String(20))  # "pretrain" or "finetune"
    dataset: Mapped[str] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result_name: Mapped[str] = mapped_column(String(200))
    activate: Mapped[bool] = mapped_column(Boolean, default=True)
    make_default: Mapped[bool] = mapped_column(Boolean, default=False)  # of its sigma, once done
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    checkpoint_id: Mapped[int | None] = mapped_column(
        ForeignKey("checkpoints.id", ondelete="SET NULL"), default=None
    )


class IdempotencyKey(Base):
    """A client's ``Idempotency-Key`` on POST /certify: the request it was first used with
    (``fingerprint``) and the job that request made (null while that request is in flight)."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("owner_id", "key", name="uq_idempotency_keys_owner_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), default=None
    )
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Evaluation(Base):
    """A test set certified through the service: one job per image (``EvaluationItem``), each
    submitted exactly like ``POST /certify`` (same identity, seed and re-use). Its status,
    progress and certified accuracy are computed from those jobs when read."""

    __tablename__ = "evaluations"
    __table_args__ = (Index("ix_evaluations_owner_created", "owner_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    # "digits:test", a folder of the server's dataset folder, or "archive:<uploaded file name>"
    source: Mapped[str] = mapped_column(Text)
    archive_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    mode: Mapped[str] = mapped_column(String(20))
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"))
    model_name: Mapped[str] = mapped_column(String(200))
    classes: Mapped[list[Any]] = mapped_column(default=list)  # the model's, at submission
    sigma: Mapped[float] = mapped_column(Float)
    alpha: Mapped[float] = mapped_column(Float)
    n0: Mapped[int] = mapped_column(Integer)
    n: Mapped[int] = mapped_column(Integer)
    target_radius: Mapped[float | None] = mapped_column(Float, default=None)
    time_budget_s: Mapped[float | None] = mapped_column(Float, default=None)
    skip: Mapped[int] = mapped_column(Integer, default=1)
    max_images: Mapped[int | None] = mapped_column(Integer, default=None)
    total: Mapped[int] = mapped_column(Integer)  # images (items)
    # Members of the set that are not certified, each {"name", "reason"} (skip_invalid).
    skipped: Mapped[list[Any]] = mapped_column(default=list, server_default="[]")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    cancelled_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class EvaluationItem(Base):
    """One image of an evaluation and the job that certifies it. A job may serve several
    evaluations (re-submitting an evaluation re-uses its finished jobs), so the link lives
    here rather than in a column of ``jobs``; the label is the evaluation's, not the job's."""

    __tablename__ = "evaluation_items"

    evaluation_id: Mapped[str] = mapped_column(
        ForeignKey("evaluations.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0 .. total - 1
    idx: Mapped[int] = mapped_column(Integer)  # the image's index in its dataset (Cohen's idx)
    name: Mapped[str] = mapped_column(Text)
    label: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    # sha256 of the file this item was read from (its record: the job's, or a JobUpload);
    # null for items made before it was recorded.
    input_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
