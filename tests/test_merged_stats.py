"""Statistical tests of DECIDE with merged selection (n0 = 0; docs/DESIGN.md section 5).

Reference: with the class chosen predictably and every class's probability <= p_max <= p*, the
predictable hits can be coupled below iid Bernoulli(p_max) hits, so the false "certified" rate
is at most the exact crossing probability of the one-sided mixture on those iid hits
(``oracle_crossing``: a test told the right class in advance), itself <= alpha by Ville's
inequality. That bound is sharper than alpha, so it has teeth: a variant that chooses the class
with the tested sample counted (not predictable) exceeds it, exactly (two classes, dynamic
programming) and by many standard errors (three and ten classes, seeded simulation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import ndtr

from bench.merged import exact_two_class, oracle_crossing, simulate, simulate_every_sample
from models.sequential import ConfidenceSequence, class_sequence, merged_chunks

P1 = float(ndtr(1.0))  # target radius = sigma
P_TIE = float(ndtr(0.05))  # target radius = sigma / 20: two classes at 1/2 sit just under it
N_EXACT = 200


def every_sample(n: int) -> list[int]:
    return list(range(1, n + 1))


@pytest.mark.parametrize("alpha", [0.001, 0.05])
@pytest.mark.parametrize(
    ("p0", "p_star"),
    [(P1 - 0.005, P1), (1 - P1 + 0.005, P1), (0.5, P_TIE)],
    ids=["top-class-0-just-under", "top-class-1-just-under", "two-equal-classes"],
)
def test_two_classes_exact_false_certified_within_the_coupling_bound(
    alpha: float, p0: float, p_star: float
) -> None:
    p_max = max(p0, 1 - p0)
    bound = oracle_crossing(p_max, p_star, alpha, every_sample(N_EXACT))
    assert bound <= alpha  # Ville
    out = exact_two_class(p0, p_star, alpha, N_EXACT)
    total = out.certified.sum() + out.not_certified + out.undecided
    assert total == pytest.approx(1.0, abs=1e-12)  # the dynamic programme loses no mass
    assert out.certified.sum() <= bound * (1 + 1e-9)
    if p0 == 0.5:  # both classes 1/2: every predictable hit is Bernoulli(1/2), the bound is exact
        assert out.certified.sum() == pytest.approx(bound, rel=1e-9)
    broken = exact_two_class(p0, p_star, alpha, N_EXACT, broken=True)
    assert broken.certified.sum() > 1.1 * bound  # not predictable: the bound no longer holds


@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_a_certifiable_class_is_never_certified_under_the_other_name(alpha: float) -> None:
    # Class 1 is certifiable (p1 > p*) but loses ties; certifying class 0 needs class 0's own
    # level-alpha/K sequence above 1 - p* > p0, which happens with probability <= alpha/K.
    for p1 in (P1 + 0.01, 0.95):
        out = exact_two_class(1 - p1, P1, alpha, N_EXACT)
        per_class = class_sequence(alpha, 2)
        assert out.certified[0] <= alpha / 2
        assert out.certified[1] > 0
        # sharper: class 0's sequence must cross 1 - p* at some sample (exact, iid hits)
        reach = _sequence_crossing(per_class, 1 - p1, 1 - P1, N_EXACT)
        assert out.certified[0] <= reach * (1 + 1e-9)


def _sequence_crossing(cs: ConfidenceSequence, p: float, level: float, n: int) -> float:
    """Exact P(the lower sequence of iid Bernoulli(p) hits lies above ``level`` at some t <= n)."""
    from models.sequential import log_evidence_above

    dist, crossed = np.array([1.0]), 0.0
    for t in range(1, n + 1):
        dist = np.convolve(dist, [1 - p, p])
        above = log_evidence_above(np.arange(t + 1), t, level, cs.above_prior) >= cs.threshold
        crossed += dist[above].sum()
        dist = np.where(above, 0.0, dist)
    return float(crossed)


RUNS = 20_000


@pytest.mark.parametrize(
    "probs",
    [
        [P1 - 0.005, (1 - P1 + 0.005) / 2, (1 - P1 + 0.005) / 2],
        [P1 - 0.005] + [(1 - P1 + 0.005) / 9] * 9,
    ],
    ids=["3-classes", "10-classes"],
)
def test_many_classes_false_certified_within_the_coupling_bound(probs: list[float]) -> None:
    alpha, n = 0.05, 300
    bound = oracle_crossing(max(probs), P1, alpha, every_sample(n))
    assert bound <= alpha
    margin = 4 * math.sqrt(bound * (1 - bound) / RUNS)
    out = simulate_every_sample(np.array(probs), P1, alpha, n, RUNS, seed=7)
    assert out.certified.sum() <= bound + margin
    broken = simulate_every_sample(np.array(probs), P1, alpha, n, RUNS, seed=7, broken=True)
    assert broken.certified.sum() > bound + margin


def test_decides_own_chunk_schedule_stays_within_the_bound_at_its_looks() -> None:
    alpha, n = 0.05, 2000
    for probs in ([P1 - 0.005, 1 - P1 + 0.005], [P1 - 0.005] + [(1 - P1 + 0.005) / 9] * 9):
        looks = [
            int(t)
            for t in np.cumsum(list(merged_chunks(ConfidenceSequence(alpha), n, P1, len(probs))))
        ]
        bound = oracle_crossing(max(probs), P1, alpha, looks)
        out, used = simulate(np.array(probs), P1, alpha, n, RUNS, seed=3)
        assert out.certified.sum() <= bound + 4 * math.sqrt(bound / RUNS)
        assert used.max() <= n


def test_false_not_certified_stays_within_alpha() -> None:
    # A class just above p*: "not certified" needs the top class's upper sequence below p*.
    for alpha in (0.001, 0.05):
        out = exact_two_class(P1 + 0.005, P1, alpha, N_EXACT)
        assert out.not_certified <= alpha
