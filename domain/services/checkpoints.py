"""Registering a checkpoint (``POST /admin/models``): an uploaded file already saved on the
server, or a file inside the server's checkpoint folder, with the options an official DMAE file
needs (its format stores no sigma, input size, class names or mean/std)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from domain import registry
from domain.errors import bad_input
from domain.store.tables import Checkpoint


@dataclass(frozen=True)
class Registration:
    """How to register: the registry name (None: from the file), whether the model serves
    requests right away, whether it becomes its sigma's default, its licence note, and who
    registers it (an admin key's id)."""

    name: str | None
    active: bool
    default: bool
    licence: str | None
    created_by: int


def _floats(text: str | None, what: str, positive: bool = False) -> list[float] | None:
    """Three comma-separated finite numbers (positive ones for ``positive``), or None."""
    if text is None or text == "":
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise bad_input(f"{what} must be comma-separated numbers, got {text!r}") from exc
    if len(values) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        kind = "positive" if positive else "finite"
        raise bad_input(f"{what} must be 3 {kind} numbers (one per RGB channel), got {text!r}")
    return values


def official_options(
    *,
    sigma: float | None,
    input_size: int | None,
    num_heads: int | None,
    classes: str | None,
    mean: str | None,
    std: str | None,
) -> dict[str, Any]:
    """The options for ``registry.register`` from the form's text: ``classes`` comma-separated
    names, ``mean`` and ``std`` 3 comma-separated numbers each (std positive). 422 for a
    sigma that is not positive and finite, or a count outside [1, 100000]."""
    options = {
        "sigma": sigma,
        "input_size": input_size,
        "num_heads": num_heads,
        "classes": [c.strip() for c in classes.split(",")] if classes else None,
        "mean": _floats(mean, "mean"),
        "std": _floats(std, "std", positive=True),
    }
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise bad_input(f"sigma must be a positive finite number, got {sigma}")
    for what, count in (("input_size", input_size), ("num_heads", num_heads)):
        if count is not None and not 1 <= count <= 100_000:
            raise bad_input(f"{what} must be a positive integer, got {count}")
    return options


def _stem(filename: str | None) -> str | None:
    """A registry name from an uploaded file's name, only if it is already a valid one."""
    if not filename:
        return None
    stem = filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1].rsplit(".", 1)[0]
    return stem if registry.NAME_RE.match(stem) else None


def register_upload(
    session: Session,
    saved: Path,
    filename: str | None,
    options: dict[str, Any],
    how: Registration,
) -> Checkpoint:
    """Register the upload saved at ``saved`` (sent as ``filename``; its stem is the default
    name). A refused upload's file is deleted unless a registered model uses it. Commits.
    Raises ``registry.register``'s errors (409 name taken, 422 not a loadable checkpoint)."""
    try:
        return _register(
            session, saved, how.name or _stem(filename), options, how,
            f"the upload {filename or 'file'!r}",
        )  # fmt: skip
    except Exception:
        if session.scalar(select(Checkpoint.id).where(Checkpoint.location == str(saved))) is None:
            saved.unlink(missing_ok=True)
        raise


def register_path(
    session: Session, folder: Path, path: str, options: dict[str, Any], how: Registration
) -> Checkpoint:
    """Register the file ``path`` (relative) inside the checkpoint folder ``folder``. Commits.
    422 for a path outside it or no such file; then as :func:`register_upload`."""
    target = registry.inside(folder, path, "checkpoint")
    if not target.is_file():
        raise bad_input(f"no checkpoint file {path!r} in the server's checkpoint folder")
    return _register(session, target, how.name, options, how, repr(path))


def _register(
    session: Session,
    location: Path,
    name: str | None,
    options: dict[str, Any],
    how: Registration,
    shown: str,
) -> Checkpoint:
    """``registry.register`` with ``how``'s choices, then commit (``shown``: the file in
    messages)."""
    row = registry.register(
        session,
        location=str(location),
        name=name,
        options=options,
        active=how.active,
        default=how.default,
        created_by=how.created_by,
        licence=how.licence,
        shown=shown,
    )
    session.commit()
    return row
