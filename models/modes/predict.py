"""PREDICT (Cohen et al. 2019, Algorithm 1): the top class unless the two-sided binomial test
of its count against the runner-up's has a p-value above alpha. No selection, no radius."""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.modes.base import Claim, Mode, RunSpec

if TYPE_CHECKING:  # the core loads torch and SciPy: imported where a mode runs
    from torch import Tensor

    from models.smoothing import Certificate, Outcome, ProgressFn, Sampler


class Predict(Mode):
    """PREDICT: a label with a binomial test; ``n0`` is 0 and the radius 0."""

    name = "predict"
    uses_n0 = False
    default_n0 = 0
    least_n0 = 0
    has_radius = False
    no_curve = (
        "a predict evaluation certifies no radius, so there is no curve to plot; "
        "GET the evaluation for its accuracy"
    )

    def draw(
        self, sampler: Sampler, x: Tensor, spec: RunSpec, progress: ProgressFn | None = None
    ) -> Certificate:
        from models import smoothing

        return smoothing.predict(
            sampler, x, spec.sigma, spec.n, spec.alpha, spec.seed, progress=progress
        )

    def recompute(self, claim: Claim) -> Outcome:
        from models import smoothing

        return smoothing.predict_outcome(claim.counts, claim.alpha)


MODE = Predict()
