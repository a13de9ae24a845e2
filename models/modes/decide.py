"""DECIDE (docs/DESIGN.md section 5): is x certified at ``target_radius``? Sequential, with the
anytime-valid confidence sequence of :mod:`models.sequential`; n0 = 0 merges the class
selection into the test."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from models.modes.base import Claim, Mismatch, Mode, RunSpec, same

if TYPE_CHECKING:  # the core loads torch and SciPy: imported where a mode runs
    from torch import Tensor

    from models.smoothing import Certificate, Outcome, ProgressFn, Sampler


class Decide(Mode):
    """DECIDE: ``decision`` certified / not_certified / undecided at ``target_radius``."""

    name = "decide"
    default_n0 = 0  # merged selection
    least_n0 = 0
    decides = True
    no_curve = (
        "a decide evaluation answers at one radius (target_radius), so there is no curve to "
        "plot; GET the evaluation for its decisions"
    )

    def check_samples(self, n: int, alpha: float) -> None:
        """Nothing without sigma: the minimum depends on the target (:meth:`check_reachable`)."""
        return None

    def check_reachable(
        self, n: int, alpha: float, sigma: float, n0: int, target_radius: float | None
    ) -> None:
        """ValueError unless the target is reachable and n could certify it."""
        from models import smoothing

        check = smoothing.check_merged_n if n0 == 0 else smoothing.check_decide_n
        check(n, alpha, sigma, cast(float, target_radius))  # None: the core's message

    def sequential(self, used: int, n: int) -> bool:
        return True

    def draw(
        self, sampler: Sampler, x: Tensor, spec: RunSpec, progress: ProgressFn | None = None
    ) -> Certificate:
        from models import smoothing

        target = spec.target_radius
        if target is None:
            raise ValueError(f"mode={self.name} needs target_radius (the radius to decide about)")
        return smoothing.decide(
            sampler, x, spec.sigma, target, spec.n0, spec.n, spec.alpha, spec.seed,
            progress=progress,
        )  # fmt: skip

    @staticmethod
    def merged(claim: Claim) -> bool:
        """n0 = 0: the class selection merged into the test (``predictable_hits`` carries it)."""
        return claim.body.get("n0") == 0

    def recompute(self, claim: Claim) -> Outcome:
        from models import smoothing

        c = claim.body
        target = cast(float, c.get("target_radius"))  # checked by the core (validate_target)
        hits = c.get("predictable_hits")
        merged = self.merged(claim)
        if merged and (not isinstance(hits, int) or isinstance(hits, bool)):
            raise Mismatch(
                f"a {self.name} certificate with n0 = 0 needs predictable_hits (a whole number)"
            )
        said = "the counts and predictable_hits" if merged else "the counts"
        counts, used, n, sigma, alpha = claim.counts, claim.used, claim.n, claim.sigma, claim.alpha
        try:
            if merged:
                hits_i = cast(int, hits)
                out = smoothing.merged_outcome(counts, hits_i, used, n, sigma, alpha, target)
            else:
                c_a = cast(int, claim.selected)  # a selecting run: the verifier found the class
                out = smoothing.decide_outcome(counts, c_a, used, n, sigma, alpha, target)
        except ValueError as exc:
            raise Mismatch(f"the decision does not follow from the counts: {exc}") from exc
        if c.get("decision") != out.decision:
            raise Mismatch(
                f"decision {c.get('decision')!r} does not follow from {said} "
                f"(they give {out.decision!r})"
            )
        if not same(c.get("pa_upper"), out.pa_upper):
            raise Mismatch(f"pa_upper {c.get('pa_upper')!r} does not follow from the counts")
        return out

    def max_radius(self, claim: Claim) -> float:
        from models import smoothing

        if self.merged(claim):
            return smoothing.merged_max_radius(claim.sigma, claim.n, claim.alpha, len(claim.counts))
        return smoothing.decide_max_radius(claim.sigma, claim.n, claim.alpha)


MODE = Decide()
