"""Issue 9 item 6: n too small for alpha. The minimum n of each mode against a brute force over
every possible count outcome, the refusal before any sampling, and the radius caps (never
negative; certify_top2's own)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, norm

from models.smoothing import (
    BatchSampler,
    certify,
    clopper_pearson_lower,
    clopper_pearson_upper,
    max_radius,
    predict,
)

SIGMA = 0.25
ALPHAS = [0.49, 0.3, 0.25, 0.1, 0.05, 0.01, 2**-7, 0.001, 1e-4, 1e-6]


def certify_possible(n: int, alpha: float) -> bool:
    """Some count k in 0..n gives CERTIFY a positive radius (brute force, no closed form)."""
    return any(norm.ppf(clopper_pearson_lower(k, n, alpha)) > 0 for k in range(n + 1))


def top2_possible(n: int, alpha: float, classes: int = 3) -> bool:
    """Some split (kA, kB, rest) gives the top-2 bound a positive radius (brute force)."""
    per_class = alpha / (2 * (classes - 1))
    for k_a in range(n + 1):
        pa = clopper_pearson_lower(k_a, n, alpha / 2)
        for k_b in range(n - k_a + 1):
            rest = n - k_a - k_b
            pb = min(max(clopper_pearson_upper(k_b, n, per_class),
                         clopper_pearson_upper(rest, n, per_class)), 1 - pa)  # fmt: skip
            if pa > 0 and norm.ppf(pa) - norm.ppf(pb) > 0 and pa > pb:
                return True
    return False


def predict_possible(n: int, alpha: float) -> bool:
    """Some top-two counts (c1, c2), c1 + c2 <= n, reject the tie at level alpha."""
    return any(
        binomtest(c1, c1 + c2, 0.5).pvalue <= alpha
        for c1 in range(1, n + 1)
        for c2 in range(0, min(c1, n - c1) + 1)
    )


def brute_min(possible, alpha: float) -> int:  # type: ignore[no-untyped-def]
    n = 1
    while not possible(n, alpha):
        n += 1
    return n


@pytest.mark.parametrize("alpha", ALPHAS)
def test_min_n_is_the_smallest_n_with_any_possible_answer(alpha: float) -> None:
    from models.smoothing import min_n

    assert min_n("certify", alpha) == brute_min(certify_possible, alpha)
    assert min_n("predict", alpha) == brute_min(predict_possible, alpha)
    if alpha >= 1e-4:  # the split brute force is cubic in n
        assert min_n("certify_top2", alpha) == brute_min(top2_possible, alpha)
    assert min_n("certify", alpha) == math.floor(math.log2(1 / alpha)) + 1


def test_min_n_at_the_issues_alpha() -> None:
    from models.smoothing import min_n

    assert (min_n("certify", 0.001), min_n("predict", 0.001)) == (10, 11)
    assert min_n("certify_top2", 0.001) == 11


def test_a_deliberately_broken_minimum_fails_the_brute_force() -> None:
    """The check above catches an off-by-one: the non-strict inequality allows n = 7 at
    alpha = 2^-7, where the best pA_lower is exactly 1/2 and no positive radius exists."""
    alpha = 2**-7
    broken = next(n for n in range(1, 50) if alpha ** (1 / n) >= 0.5)
    assert broken == 7 != brute_min(certify_possible, alpha) == 8


class Constant(torch.nn.Module):
    """Always class 0: every sample a hit, the best case for every mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 3)
        out[:, 0] = 1
        return out


@pytest.mark.parametrize(
    ("call", "minimum"),
    [
        (lambda s, x: certify(s, x, SIGMA, 10, 5, 0.001, 0), "n >= 10"),
        (lambda s, x: certify(s, x, SIGMA, 10, 9, 0.001, 0), "n >= 10"),
        (lambda s, x: certify(s, x, SIGMA, 10, 10, 0.001, 0, top2=True), "n >= 11"),
        (lambda s, x: predict(s, x, SIGMA, 9, 0.001, 0), "n >= 11"),
    ],
)
def test_the_core_refuses_before_sampling(call, minimum: str) -> None:  # type: ignore[no-untyped-def]
    drawn: list[int] = []

    class Counting(BatchSampler):
        def counts(self, *a, **k):  # type: ignore[no-untyped-def]
            drawn.append(1)
            return super().counts(*a, **k)

    with pytest.raises(ValueError, match=minimum):
        call(Counting(Constant(), 3), torch.zeros(1, 2, 2))
    assert drawn == []


def test_at_the_minimum_a_constant_classifier_is_certified() -> None:
    x, sampler = torch.zeros(1, 2, 2), BatchSampler(Constant(), 3)
    assert certify(sampler, x, SIGMA, 10, 10, 0.001, 0).radius > 0
    assert certify(sampler, x, SIGMA, 10, 11, 0.001, 0, top2=True).radius > 0
    assert predict(sampler, x, SIGMA, 11, 0.001, 0).prediction == 0


def test_max_radius_is_never_negative() -> None:
    """The issue's n=5 at alpha 0.001 reported max_radius -0.168."""
    assert max_radius(SIGMA, 5, 0.001) == 0.0
    for n in range(1, 40):
        for alpha in ALPHAS:
            assert max_radius(SIGMA, n, alpha) >= 0.0


@pytest.mark.parametrize("n", [11, 100, 1000])
def test_top2_max_radius_is_its_own_cap_and_is_reached(n: int) -> None:
    """certify_top2 reported CERTIFY's cap; its own is sigma Phi^-1((alpha/2)^(1/n)), reached
    by a constant classifier (pB_upper is capped by 1 - pA_lower)."""
    cert = certify(BatchSampler(Constant(), 3), torch.zeros(1, 2, 2), SIGMA, 10, n, 0.001, 0,
                   top2=True)  # fmt: skip
    assert cert.max_radius == pytest.approx(SIGMA * norm.ppf(0.0005 ** (1 / n)), rel=1e-12)
    assert cert.radius == pytest.approx(cert.max_radius, rel=1e-9)
    assert cert.max_radius < max_radius(SIGMA, n, 0.001)


def test_no_top2_outcome_exceeds_its_cap() -> None:
    """Brute force over every split of n = 30 samples among 3 classes."""
    n, alpha = 30, 0.05
    cap = max_radius(SIGMA, n, alpha / 2)
    best = 0.0
    per_class = alpha / 4
    for k_a in range(n + 1):
        pa = clopper_pearson_lower(k_a, n, alpha / 2)
        for k_b in range(n - k_a + 1):
            ub = max(clopper_pearson_upper(k_b, n, per_class),
                     clopper_pearson_upper(n - k_a - k_b, n, per_class))  # fmt: skip
            pb = min(ub, 1 - pa)
            if pa > pb and pa > 0:
                best = max(best, 0.5 * SIGMA * (norm.ppf(pa) - norm.ppf(pb)))
    assert best == pytest.approx(cap, rel=1e-9)
    assert np.isfinite(best)
