"""The model registry: registering checkpoints (bundled, uploaded, server-side path, trained),
activating them, choosing each sigma's default model, and choosing the model a request is
certified with.

A request that names no model runs on its sigma's *default* model, a flag an admin sets
deliberately (:func:`set_default`); registering a model, or a training run finishing, never
makes it the default unless asked to. The bundled models are their sigmas' defaults when first
registered on a service that has none.

Checkpoints are only ever read through ``models.checkpoints`` (safetensors, or official files
with ``weights_only=True``), so registering a file never runs code from it.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from domain.errors import ServiceError, bad_input
from domain.store.tables import Checkpoint
from models.training.recipes import recipe_name_of

log = logging.getLogger("dmae.registry")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
BUNDLED_PREFIX = "bundled:"
PROJECT_LICENCE = "Trained with dmae-certify (Apache-2.0 code); see the model's source."
OFFICIAL_OPTIONS = ("input_size", "mean", "std", "classes", "sigma", "num_heads")


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise bad_input(
            f"invalid model name {name!r}: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def location_path(location: str) -> Path:
    """The file behind a registry location (``bundled:<name>`` or an absolute path)."""
    from models.checkpoints import CheckpointError, bundled_models

    if location.startswith(BUNDLED_PREFIX):
        name = location[len(BUNDLED_PREFIX) :]
        bundled = bundled_models()
        if name not in bundled:
            raise CheckpointError(f"bundled model {name!r} is not installed")
        return bundled[name]
    return Path(location)


def inside(base: Path, requested: str, what: str) -> Path:
    """``requested`` (relative to ``base``, or absolute) resolved, refusing anything outside
    with 422. The answer names the folder by ``what`` ("dataset", "checkpoint"), never by its
    path: a client must not learn the server's folders."""
    if not requested or "\x00" in requested:
        raise bad_input("empty or invalid path")
    root = base.resolve()
    candidate = Path(requested)
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not path.is_relative_to(root):
        raise bad_input(
            f"path {requested!r} is outside the server's {what} folder: give a path relative "
            "to it, without '..'"
        )
    return path


BUILT_IN_PREFIXES = ("digits:", "mnist:")
BUILT_IN_DATASETS = ("digits:train", "digits:test", "mnist:train", "mnist:test")


def dataset(base: Path, spec: str) -> str:
    """A server-side dataset (training runs, evaluations): a built-in one, returned as is, or
    the resolved path of a folder inside ``base`` (the server's dataset folder); 422 else."""
    if spec.startswith(BUILT_IN_PREFIXES):
        if spec not in BUILT_IN_DATASETS:
            raise bad_input(
                f"the built-in datasets are {', '.join(BUILT_IN_DATASETS[:-1])} "
                f"and {BUILT_IN_DATASETS[-1]}"
            )
        return spec
    folder = inside(base, spec, "dataset")
    if not folder.is_dir():
        raise bad_input(f"no dataset folder {spec!r} in the server's dataset folder")
    return str(folder)


def describe(path: Path, options: dict[str, Any], shown: str | None = None) -> tuple[str, Any]:
    """(format, CheckpointMeta) of a checkpoint file, validating it without running code.

    Project files only have their metadata read (the weights are verified when a worker loads
    them); official files are imported in full, since their architecture comes from the tensors.
    """
    from models.checkpoints import CheckpointError, import_official, read_meta

    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise bad_input(f"cannot read checkpoint: {exc.strerror or exc}") from exc
    try:
        if len(head) == 9 and head[8:9] == b"{":
            return "project", read_meta(path)
        _, meta = import_official(path, **options)
        return "official", meta
    except (CheckpointError, ValueError, TypeError, RuntimeError) as exc:
        # An upload is named as the client named it, never by the server's file path.
        said = str(exc).replace(str(path), shown) if shown is not None else str(exc)
        raise bad_input(f"checkpoint refused: {said}") from exc


def check_recorded_sigma(fmt: str, sigma: Any, kind: str = "classifier") -> None:
    """422 unless the training sigma a file records (an official file's ``args.sigma``, which
    may hold any plain data its pickle allows, or a project file's metadata) is absent or a
    positive finite number: it would be stored as the model's sigma and route requests. A
    pre-trained encoder may record 0 (plain MAE, no noise): it routes no request."""
    number = isinstance(sigma, int | float) and not isinstance(sigma, bool)
    if sigma is None or (
        number and math.isfinite(sigma) and (sigma > 0 or (sigma == 0 and kind == "pretrain"))
    ):
        return
    fix = ": give the sigma it was trained for in the sigma field" if fmt == "official" else ""
    raise bad_input(
        f"checkpoint refused: it records sigma = {sigma!r} ({type(sigma).__name__}), not a "
        f"positive finite number{fix}"
    )


def register(
    session: Session,
    *,
    location: str,
    name: str | None = None,
    options: dict[str, Any] | None = None,
    active: bool = True,
    default: bool = False,
    created_by: int | None = None,
    licence: str | None = None,
    shown: str | None = None,
) -> Checkpoint:
    """Validate the checkpoint at ``location`` and add it to the registry (409 if the name is
    taken); errors name the file ``shown`` (an upload's own name) when given. With ``default``
    it becomes its sigma's default model (:func:`set_default`: 422 unless an active classifier
    with a sigma). The row is flushed, not committed: the caller commits, together with
    whatever else must become visible at the same time."""
    from models.checkpoints import OFFICIAL_LICENCE, file_sha256

    options = {k: v for k, v in (options or {}).items() if k in OFFICIAL_OPTIONS and v is not None}
    path = location_path(location)
    fmt, meta = describe(path, options, shown)
    check_recorded_sigma(fmt, meta.sigma, meta.kind)
    name = check_name(name or meta.name or path.stem)
    if session.scalar(select(Checkpoint).where(Checkpoint.name == name)) is not None:
        raise ServiceError(409, f"a model named {name!r} is already registered")
    if default:
        check_can_be_default(name, meta.kind, active, meta.sigma)
    row = Checkpoint(
        name=name,
        location=location,
        file_sha256=file_sha256(path),
        weights_sha256=meta.weights_sha256,
        format=fmt,
        kind=meta.kind,
        sigma=meta.sigma,
        num_classes=meta.num_classes,
        classes=list(meta.classes),
        input_size=meta.input_size,
        arch=meta.arch.to_dict(),
        licence=licence
        or meta.licence
        or (OFFICIAL_LICENCE if fmt == "official" else "")
        or PROJECT_LICENCE,
        source=meta.source,
        recipe=recipe_name_of(meta.training),
        import_options=options if fmt == "official" else {},
        active=active,
        created_by=created_by,
    )
    session.add(row)
    try:
        session.flush()
        SNAPSHOTS.invalidate()
    except IntegrityError as exc:
        session.rollback()
        raise ServiceError(409, f"a model named {name!r} is already registered") from exc
    if default:
        set_default(session, name)
    log.info("registered model %s (%s, sigma=%s) from %s", name, meta.kind, meta.sigma, location)
    return row


def register_bundled(session: Session) -> list[str]:
    """Register every bundled model not yet in the registry; returns the names added."""
    from models.checkpoints import CheckpointError, bundled_models, file_sha256, read_meta

    added = []
    for name, path in bundled_models().items():
        row = session.scalar(select(Checkpoint).where(Checkpoint.name == name))
        if row is not None:
            if row.location == BUNDLED_PREFIX + name and row.file_sha256 != file_sha256(path):
                log.warning("bundled model %s changed on disk since it was registered", name)
            continue
        try:
            sigma = read_meta(path).sigma
            taken = sigma is None or default_for(session, sigma) is not None
            register(session, location=BUNDLED_PREFIX + name, name=name, default=not taken)
            session.commit()
            added.append(name)
        except (ServiceError, CheckpointError) as exc:
            log.error("bundled model %s not registered: %s", name, exc)
    return added


def get_model(session: Session, name: str, lock: bool = False) -> Checkpoint:
    """Model ``name`` (404 if none); with ``lock``, its row locked until the transaction ends
    and re-read after any concurrent change (PostgreSQL; SQLite has one writer at a time)."""
    query = select(Checkpoint).where(Checkpoint.name == name)
    if lock:
        query = query.with_for_update().execution_options(populate_existing=True)
    row = session.scalar(query)
    if row is None:
        raise ServiceError(404, f"no registered model named {name!r}")
    return row


def _lock_sigma(session: Session, sigma: float) -> None:
    """Lock every model row of ``sigma`` (in id order, so two callers never deadlock) and
    re-read them: changes of that sigma's default then happen one after the other, each
    seeing the one before, instead of both reading the old default and the second failing on
    the one-default index."""
    tol = 1e-9 * max(1.0, sigma)  # same_sigma's
    session.scalars(
        select(Checkpoint)
        .where(Checkpoint.sigma.between(sigma - tol, sigma + tol))
        .order_by(Checkpoint.id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).all()


@dataclass(frozen=True)
class Choice:
    """What a submission needs to know of the model it runs on (a snapshot of its row)."""

    id: int
    name: str
    kind: str
    active: bool
    sigma: float | None
    input_size: int
    file_sha256: str
    default: bool = False

    @classmethod
    def of(cls, row: Checkpoint) -> Choice:
        return cls(
            row.id,
            row.name,
            row.kind,
            row.active,
            row.sigma,
            row.input_size,
            row.file_sha256,
            row.is_default,
        )


class Snapshots:
    """The registry's rows as :class:`Choice` records, re-read when older than ``max_age_s``.

    Choosing a model is on every submission's path; reading every classifier row (with its
    class names and architecture) each time cost a query and ORM work. A change made by this
    process (:func:`register`, activation) is seen at once; one made by another API process
    within ``max_age_s`` seconds."""

    def __init__(self) -> None:
        self._rows: dict[str, tuple[float, list[Choice]]] = {}
        self._lock = threading.Lock()

    def rows(self, session: Session, max_age_s: float) -> list[Choice]:
        key = str(session.get_bind().engine.url)
        now = time.monotonic()
        with self._lock:
            hit = self._rows.get(key)
        if hit is not None and now - hit[0] < max_age_s:
            return hit[1]
        query = select(
            Checkpoint.id, Checkpoint.name, Checkpoint.kind, Checkpoint.active,
            Checkpoint.sigma, Checkpoint.input_size, Checkpoint.file_sha256,
            Checkpoint.is_default,
        ).order_by(Checkpoint.id.desc())  # fmt: skip
        rows = [Choice(*r) for r in session.execute(query).all()]
        with self._lock:
            self._rows[key] = (now, rows)
        return rows

    def invalidate(self) -> None:
        with self._lock:
            self._rows.clear()


SNAPSHOTS = Snapshots()


def set_active(session: Session, name: str, active: bool) -> Checkpoint:
    """Serve (or stop serving) new requests with model ``name``; the caller commits. A
    deactivated model stops being its sigma's default (requests without a model then get a
    422 until an admin sets another); activating it again does not make it the default."""
    row = get_model(session, name, lock=True)  # after a concurrent set_default of it
    row.active = active
    if not active:
        row.is_default = False
    SNAPSHOTS.invalidate()
    return row


def same_sigma(a: float | None, b: float) -> bool:
    """Whether a model trained at ``a`` serves requests for ``b`` (equal up to rounding)."""
    return a is not None and abs(a - b) <= 1e-9 * max(1.0, b)


def default_for(session: Session, sigma: float) -> Checkpoint | None:
    """The default model of ``sigma`` (read now, not from the snapshots), if any."""
    rows = session.scalars(select(Checkpoint).where(Checkpoint.is_default.is_(True))).all()
    return next((r for r in rows if same_sigma(r.sigma, sigma)), None)


def check_can_be_default(name: str, kind: str, active: bool, sigma: float | None) -> float:
    """The sigma of a model that can be that sigma's default; 422 for any other model."""
    if kind != "classifier":
        raise bad_input(f"model {name!r} is a pre-training checkpoint: it cannot serve requests")
    if not active:
        raise bad_input(f"model {name!r} is deactivated: activate it before making it a default")
    if sigma is None:
        raise bad_input(
            f"model {name!r} has no training sigma, so it cannot be a sigma's default; "
            "requests can still name it"
        )
    return sigma


def set_default(session: Session, name: str) -> Checkpoint:
    """Make model ``name`` the default of its sigma: requests with that sigma and no model run
    on it, instead of the previous default. 422 unless it is an active classifier with a
    sigma. The caller commits."""
    row = get_model(session, name)
    if row.sigma is not None:
        _lock_sigma(session, row.sigma)  # waits for, then sees, a concurrent change
    sigma = check_can_be_default(name, row.kind, row.active, row.sigma)
    previous = default_for(session, sigma)
    try:
        if previous is not None and previous.id != row.id:
            previous.is_default = False
            session.flush()  # one default per sigma at every moment (a unique index)
        row.is_default = True
        session.flush()
    except IntegrityError as exc:  # a model of this sigma registered as its default meanwhile
        session.rollback()
        raise ServiceError(
            409,
            f"the default model for sigma={sigma:g} was changed at the same time by another "
            "request: look at GET /models and retry",
        ) from exc
    SNAPSHOTS.invalidate()
    log.info(
        "model %s is the default for sigma=%g (was %s)",
        name,
        row.sigma,
        previous.name if previous is not None else "none",
    )
    return row


def choose(
    session: Session, sigma: float | None, name: str | None, max_age_s: float = 0.0
) -> Choice:
    """The model a request runs on: the named one, else ``sigma``'s default model (an active
    classifier an admin made the default, :func:`set_default`), from rows at most
    ``max_age_s`` seconds old. Every failure is a 422 that says what to do."""
    rows = SNAPSHOTS.rows(session, max_age_s)
    if name is not None:
        row = next((r for r in rows if r.name == name), None)
        if row is None:
            raise bad_input(f"unknown model {name!r}; GET /models lists the registered ones")
        if not row.active:
            raise bad_input(f"model {name!r} is deactivated")
        if row.kind != "classifier":
            raise bad_input(f"model {name!r} is a pre-training checkpoint without a classifier")
        return row
    if sigma is None:
        raise bad_input("give sigma (the noise level) or a model name")
    candidates = [r for r in rows if r.active and r.kind == "classifier"]
    at_sigma = [r for r in candidates if same_sigma(r.sigma, sigma)]
    chosen = next((r for r in at_sigma if r.default), None)
    if chosen is not None:
        return chosen
    if at_sigma:
        names = ", ".join(sorted(r.name for r in at_sigma))
        raise bad_input(
            f"no default model for sigma={sigma:g}: name one with the model field ({names} "
            "are trained for it; GET /models lists them), or an admin makes one the default "
            "(POST /admin/models/{name}/default)"
        )
    trained = sorted({r.sigma for r in candidates if r.sigma is not None})
    raise bad_input(
        f"no active model trained for sigma={sigma:g}; models exist for sigma in "
        f"{', '.join(f'{s:g}' for s in trained) or '(none)'}; name one with the model field"
    )
