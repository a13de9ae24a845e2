"""The model registry: registering checkpoints (bundled, uploaded, server-side path, trained),
activating them, and choosing the model a request is certified with.

Checkpoints are only ever read through ``models.checkpoints`` (safetensors, or official files
with ``weights_only=True``), so registering a file never runs code from it.
"""

from __future__ import annotations

import logging
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
from domain.tables import Checkpoint
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


def inside(base: Path, requested: str) -> Path:
    """``requested`` (relative to ``base``, or absolute) resolved, refusing anything outside."""
    if not requested or "\x00" in requested:
        raise bad_input("empty or invalid path")
    root = base.resolve()
    candidate = Path(requested)
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not path.is_relative_to(root):
        raise bad_input(f"path {requested!r} is outside the allowed folder {root}")
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
    folder = inside(base, spec)
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


def register(
    session: Session,
    *,
    location: str,
    name: str | None = None,
    options: dict[str, Any] | None = None,
    active: bool = True,
    created_by: int | None = None,
    licence: str | None = None,
    shown: str | None = None,
) -> Checkpoint:
    """Validate the checkpoint at ``location`` and add it to the registry (409 if the name is
    taken); errors name the file ``shown`` (an upload's own name) when given. The row is
    flushed, not committed: the caller commits, together with whatever else must become
    visible at the same time."""
    from models.checkpoints import OFFICIAL_LICENCE, file_sha256

    options = {k: v for k, v in (options or {}).items() if k in OFFICIAL_OPTIONS and v is not None}
    path = location_path(location)
    fmt, meta = describe(path, options, shown)
    name = check_name(name or meta.name or path.stem)
    if session.scalar(select(Checkpoint).where(Checkpoint.name == name)) is not None:
        raise ServiceError(409, f"a model named {name!r} is already registered")
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
    log.info("registered model %s (%s, sigma=%s) from %s", name, meta.kind, meta.sigma, location)
    return row


def register_bundled(session: Session) -> list[str]:
    """Register every bundled model not yet in the registry; returns the names added."""
    from models.checkpoints import CheckpointError, bundled_models, file_sha256

    added = []
    for name, path in bundled_models().items():
        row = session.scalar(select(Checkpoint).where(Checkpoint.name == name))
        if row is not None:
            if row.location == BUNDLED_PREFIX + name and row.file_sha256 != file_sha256(path):
                log.warning("bundled model %s changed on disk since it was registered", name)
            continue
        try:
            register(session, location=BUNDLED_PREFIX + name, name=name)
            session.commit()
            added.append(name)
        except (ServiceError, CheckpointError) as exc:
            log.error("bundled model %s not registered: %s", name, exc)
    return added


def get_model(session: Session, name: str) -> Checkpoint:
    row = session.scalar(select(Checkpoint).where(Checkpoint.name == name))
    if row is None:
        raise ServiceError(404, f"no registered model named {name!r}")
    return row


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

    @classmethod
    def of(cls, row: Checkpoint) -> Choice:
        return cls(
            row.id, row.name, row.kind, row.active, row.sigma, row.input_size, row.file_sha256
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
    """Serve (or stop serving) new requests with model ``name``; the caller commits."""
    row = get_model(session, name)
    row.active = active
    SNAPSHOTS.invalidate()
    return row


def choose(
    session: Session, sigma: float | None, name: str | None, max_age_s: float = 0.0
) -> Choice:
    """The model a request runs on: the named one, else the newest active classifier trained
    at ``sigma``, from rows at most ``max_age_s`` seconds old. Every failure is a 422 that says
    what to do."""
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
    for row in candidates:
        if row.sigma is not None and abs(row.sigma - sigma) <= 1e-9 * max(1.0, sigma):
            return row
    trained = sorted({r.sigma for r in candidates if r.sigma is not None})
    raise bad_input(
        f"no active model trained for sigma={sigma:g}; models exist for sigma in "
        f"{', '.join(f'{s:g}' for s in trained) or '(none)'}; name one with the model field"
    )
