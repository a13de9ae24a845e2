"""CERTIFY (Cohen, Rosenfeld, Kolter 2019, section 3.2): select cA on n0 samples, bound pA on n
fresh ones, radius sigma * Phi^-1(pA_lower); optionally stopped by a time budget."""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.modes.base import Claim, Mode, RunSpec

if TYPE_CHECKING:  # the core loads torch and SciPy: imported where a mode runs
    from torch import Tensor

    from models.smoothing import Certificate, Outcome, ProgressFn, Sampler


class Certify(Mode):
    """CERTIFY with a one-sided Clopper-Pearson bound (or the anytime-valid one after a
    budgeted stop)."""

    name = "certify"
    takes_time_budget = True

    def draw(
        self, sampler: Sampler, x: Tensor, spec: RunSpec, progress: ProgressFn | None = None
    ) -> Certificate:
        from models import smoothing

        return smoothing.certify(
            sampler, x, spec.sigma, spec.n0, spec.n, spec.alpha, spec.seed,
            top2=self.top2, time_budget_s=spec.time_budget_s, stop_after=spec.stop_after,
            progress=progress,
        )  # fmt: skip

    def recompute(self, claim: Claim) -> Outcome:
        from models import smoothing

        assert claim.selected is not None  # a selecting mode: the verifier found the class
        lower, upper = smoothing.bounds(claim.bound, claim.used)
        return smoothing.certify_outcome(
            claim.counts, claim.selected, claim.used, claim.sigma, claim.alpha,
            top2=self.top2, lower=lower, upper=upper,
        )  # fmt: skip


MODE = Certify()
