"""What every job mode is: its typed run parameters (:class:`RunSpec`), its facts (n0, radius,
target radius, time budget, curve), its checks, how it runs on a sampler and how a verifier
re-checks its certificate. One subclass of :class:`Mode` per module of this package.

The statistics are never here: each mode calls the core (:mod:`models.smoothing`,
:mod:`models.sequential`), which the service, the worker, the CLI and the verifier share.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the core loads torch and SciPy: imported where a mode runs or checks
    from torch import Tensor

    from models.smoothing import Certificate, Outcome, ProgressFn, Sampler


@dataclass(frozen=True)
class RunSpec:
    """One run's parameters, as a job stores them and the worker, CLI and verifier use them.

    ``n0``: selection samples as stored (0 for modes without a selection stage); ``n``:
    estimation samples (the cap for a sequential mode); ``target_radius``: the L2 radius a
    deciding mode answers about; ``time_budget_s``: seconds after which a budgeted mode stops;
    ``stop_after``: re-run a budgeted stop exactly (a replay draws that many samples)."""

    mode: str
    sigma: float
    alpha: float
    n0: int
    n: int
    seed: int
    target_radius: float | None = None
    time_budget_s: float | None = None
    stop_after: int | None = None

    @classmethod
    def of_certificate(cls, c: Mapping[str, object]) -> RunSpec:
        """The run behind certificate ``c``, to replay it: its seed, no time budget, and a
        stop where it stopped early (``n_used`` below ``n``). KeyError/TypeError/ValueError for
        a body without the fields."""
        target = c.get("target_radius")
        return cls(
            mode=str(c["mode"]),
            sigma=_float(c["sigma"]),
            alpha=_float(c["alpha"]),
            n0=_int(c["n0"]),
            n=_int(c["n"]),
            seed=_int(c["seed"]),
            target_radius=None if target is None else _float(target),
        ).replaying(c)

    def replaying(self, c: Mapping[str, object]) -> RunSpec:
        """This run as a replay of certificate ``c`` draws it: no time budget, and a stop where
        ``c``'s run stopped early (``n_used`` below ``n``), so the same samples come out."""
        used = c.get("n_used")
        stop = None if used in (None, self.n) else _int(used)
        return replace(self, time_budget_s=None, stop_after=stop)


def _int(value: object) -> int:
    """A JSON number (or numeric string) as an int; TypeError for anything else."""
    if isinstance(value, int | float | str):
        return int(value)
    raise TypeError(f"expected a number, got {value!r}")


def _float(value: object) -> float:
    """A JSON number (or numeric string) as a float; TypeError for anything else."""
    if isinstance(value, int | float | str):
        return float(value)
    raise TypeError(f"expected a number, got {value!r}")


REL_TOL, ABS_TOL = 1e-9, 1e-12  # recomputed floats agree to the last few bits across SciPy builds


def same(claimed: object, recomputed: float | None) -> bool:
    """Whether a certificate's number ``claimed`` is the recomputed one (both None, or a real
    number, not a bool, within REL_TOL / ABS_TOL)."""
    if recomputed is None or claimed is None:
        return claimed is None and recomputed is None
    if isinstance(claimed, bool) or not isinstance(claimed, numbers.Real):
        return False
    return math.isclose(float(claimed), float(recomputed), rel_tol=REL_TOL, abs_tol=ABS_TOL)


class Mismatch(ValueError):
    """A certificate whose claims do not follow from its counts; the message says which."""


@dataclass(frozen=True)
class Claim:
    """A certificate's fields a re-check needs, already checked for type and range.

    ``selected``: the class the selection chose (None for modes without selection);
    ``used``: estimation samples drawn (``n_used``); ``bound``: the bound it names."""

    body: Mapping[str, object]
    counts: list[int]
    selected: int | None
    used: int
    n: int
    sigma: float
    alpha: float
    bound: str


class Mode(ABC):
    """A job mode. Class attributes are its facts; methods its checks, run and re-check.

    ``family``: the mode it is a variant of (the CLI subcommand that runs it), by default
    itself; ``core``: the procedure of :mod:`models.smoothing` whose sample-size rule applies
    (:func:`models.smoothing.check_n`), by default the parent mode's (a mode subclassing
    :class:`Mode` directly: its own name); ``top2``: the variant
    ``--top2`` selects. ``no_curve``: why an evaluation in this mode has no certified-accuracy
    curve (None: it has one)."""

    name: str
    family: str
    core: str
    top2: bool = False
    uses_n0: bool = True  # has a selection stage of n0 samples
    default_n0: int = 100
    least_n0: int = 1
    has_radius: bool = True
    decides: bool = False  # answers "certified at target_radius?" (takes target_radius)
    takes_time_budget: bool = False
    no_curve: str | None = None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a mode of its own, unless it says what it varies
            cls.family = cls.__dict__.get("family", cls.name)
            cls.core = cls.__dict__.get("core", getattr(cls, "core", cls.name))

    @property
    def has_curve(self) -> bool:
        return self.no_curve is None

    def selection_samples(self, n0: int | None) -> int:
        """n0 as a job stores it: the given value, else the mode's default; 0 without
        selection."""
        if not self.uses_n0:
            return 0
        return self.default_n0 if n0 is None else n0

    def level(self, alpha: float) -> float:
        """The level of pA's bound, hence of the radius cap (top-2: alpha / 2)."""
        return alpha

    def validate(self, sigma: float, alpha: float, n: int, n0: int | None) -> None:
        """The core's checks of sigma, alpha, n and (where used) n0; ValueError with the
        reason (:func:`models.smoothing.validate`)."""
        from models import smoothing

        n0 = n0 if self.uses_n0 else None
        smoothing.validate(sigma, alpha, n, n0, n0_zero_ok=self.least_n0 == 0)

    def check_samples(self, n: int, alpha: float) -> None:
        """ValueError with the minimum when n samples can never answer at alpha (checks that
        need no sigma)."""
        from models import smoothing

        smoothing.check_n(self.core, n, alpha)

    def check_reachable(
        self, n: int, alpha: float, sigma: float, n0: int, target_radius: float | None
    ) -> None:
        """ValueError when n cannot answer with this sigma (only deciding modes: the target)."""
        return None

    def sequential(self, used: int, n: int) -> bool:
        """Whether a run of ``used`` of ``n`` samples takes the anytime-valid bound."""
        return used < n

    def run(
        self, sampler: Sampler, x: Tensor, spec: RunSpec, progress: ProgressFn | None = None
    ) -> Certificate:
        """Run the mode on input ``x`` (preprocessed, (3, H, W)) with ``spec``: its
        :meth:`draw`, with the certificate named for this mode (a mode that reuses another's
        core procedure still signs its own name)."""
        certificate = self.draw(sampler, x, spec, progress)
        certificate.mode = self.name
        return certificate

    @abstractmethod
    def draw(
        self, sampler: Sampler, x: Tensor, spec: RunSpec, progress: ProgressFn | None = None
    ) -> Certificate:
        """Run the core (:mod:`models.smoothing`, :mod:`models.sequential`) with ``spec``'s
        parameters."""

    @abstractmethod
    def recompute(self, claim: Claim) -> Outcome:
        """The statistics ``claim``'s counts give; :class:`Mismatch` for a claim the mode's
        own fields contradict."""

    def max_radius(self, claim: Claim) -> float:
        """The cap on the radius: sigma * Phi^-1(level^(1/n)) at a fixed n (Cohen et al.
        2019, section 3.2); after a budgeted stop the sequence's bound after used hits of used."""
        from models import smoothing

        sigma, used, n, level = claim.sigma, claim.used, claim.n, self.level(claim.alpha)
        if used < n:
            from scipy.stats import norm

            lower = smoothing.bounds(claim.bound, used)[0]
            return max(0.0, sigma * float(norm.ppf(lower(used, level))))
        return smoothing.max_radius(sigma, n, level)

    def facts(self) -> dict[str, object]:
        """What a form needs to know of the mode (the page's config.json)."""
        return {
            "uses_n0": self.uses_n0,
            "default_n0": self.selection_samples(None),
            "has_radius": self.has_radius,
            "has_curve": self.has_curve,
            "takes_target_radius": self.decides,
            "takes_time_budget": self.takes_time_budget,
        }
