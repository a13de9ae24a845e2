"""The job modes, registered by name: one module each (``certify``, ``certify_top2``,
``predict``, ``decide``), a subclass of :class:`models.modes.base.Mode`.

Everything that names modes reads them here: the API's ``Mode`` type (``app.schemas``), the
page's ``config.json``, the CLI's choices, submission checks, the worker, evaluations and the
verifier. Add a mode: write its module and add it to :data:`MODES` (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from models.modes import certify, certify_top2, decide, predict
from models.modes.base import Claim, Mismatch, Mode, RunSpec

__all__ = [
    "DEFAULT", "MODES", "Claim", "Mismatch", "Mode", "RunSpec", "by_family", "get_mode", "register",
    "variant",
]  # fmt: skip

# In the API's order (the OpenAPI enum, config.json's list, the submission error's list).
MODES: dict[str, Mode] = {
    m.name: m for m in (certify.MODE, predict.MODE, certify_top2.MODE, decide.MODE)
}
DEFAULT = certify.MODE.name  # a request's mode when it names none


def get_mode(name: object) -> Mode:
    """The registered mode called ``name``; ValueError naming the known ones otherwise."""
    found = MODES.get(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {name!r}")
    return found


def register(mode: Mode) -> None:
    """Add ``mode`` to :data:`MODES` (tests register toy modes; the four are built in)."""
    MODES[mode.name] = mode


def by_family() -> list[Mode]:
    """The modes with each variant right after its base mode (certify, certify_top2, ...): the
    order of the CLI's ``--mode`` choices and the verifier's list."""
    return [v for m in MODES.values() if m.family == m.name for v in MODES.values()
            if v.family == m.name]  # fmt: skip


def variant(family: str, top2: bool) -> Mode:
    """The mode the CLI subcommand ``family`` runs, with or without ``--top2``."""
    return next(m for m in MODES.values() if m.family == family and m.top2 == top2)
