"""Statistical tests of the certification core: the bounds, their coverage, and radius validity.

Every Monte-Carlo test runs the real :func:`certify` / :func:`predict` with :class:`BatchSampler`
over seeded trials and compares the observed failure count with its *exact* expectation
(computed here independently with scipy), so the tests fail both when a guarantee is broken and
when the statistics are not what docs/DESIGN.md section 2 specifies.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom, binomtest, norm
from statsmodels.stats.proportion import proportion_confint
from torch import Tensor, nn

from models.smoothing import (
    BatchSampler,
    NoiseStream,
    certify,
    clopper_pearson_lower,
    clopper_pearson_upper,
    predict,
)

# Observed counts must lie within this many standard deviations of their exact expectation.
# Seeded, so the outcome is fixed; for a correct implementation a miss would have odds < 1e-4.
Z_TOL = 4.0


def exact_lower_exceeds(n: int, p: float, alpha: float) -> float:
    """P(Clopper-Pearson lower bound at level alpha > p) for k ~ Bin(n, p), from the definition."""
    ks = np.arange(n + 1)
    lower = np.where(ks > 0, beta.ppf(alpha, np.maximum(ks, 1), n - ks + 1), 0.0)
    return float(binom.pmf(ks[lower > p], n, p).sum())


def exact_lower_at_least_half(n: int, p: float, alpha: float) -> float:
    """P(Clopper-Pearson lower bound >= 1/2) for k ~ Bin(n, p) (a certificate is issued)."""
    ks = np.arange(n + 1)
    lower = np.where(ks > 0, beta.ppf(alpha, np.maximum(ks, 1), n - ks + 1), 0.0)
    return float(binom.pmf(ks[lower >= 0.5], n, p).sum())


def assert_count_matches(observed: int, expectations: list[float], what: str) -> None:
    """``observed`` is a sum of independent Bernoulli(q_i): within Z_TOL sd of sum(q_i)."""
    mean = sum(expectations)
    sd = math.sqrt(sum(q * (1 - q) for q in expectations))
    assert abs(observed - mean) <= Z_TOL * sd + 1, (
        f"{what}: observed {observed}, exact expectation {mean:.1f} (sd {sd:.1f})"
    )


def binomial_ceiling(trials: int, rate: float) -> int:
    """Largest count still compatible (odds 1e-5) with a true rate of ``rate``."""
    return int(binom.ppf(1 - 1e-5, trials, rate))


def selected_class(model: nn.Module, x: Tensor, sigma: float, n0: int, seed: int) -> int:
    """The class CERTIFY selects: the top class on the first n0 samples of the seed's stream."""
    noise = NoiseStream(seed, x.shape).take(n0)
    with torch.no_grad():
        return int(torch.bincount(model(x + sigma * noise).argmax(1)).argmax())


# ---------------------------------------------------------------- Clopper-Pearson bounds


def random_cases(count: int, seed: int) -> list[tuple[int, int, float]]:
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        n = int(np.exp(rng.uniform(0, math.log(200_000))))
        k = int(rng.integers(0, n + 1))
        alpha = float(np.exp(rng.uniform(math.log(1e-6), math.log(0.49))))
        cases.append((k, n, alpha))
    for n in (1, 2, 10, 1000, 100_000):  # the edges: no hits, all hits
        for alpha in (1e-6, 1e-3, 0.05, 0.25, 0.49):
            cases += [(0, n, alpha), (n, n, alpha), (1, n, alpha), (n - 1, n, alpha)]
    return cases


def test_clopper_pearson_lower_equals_statsmodels() -> None:
    for k, n, alpha in random_cases(3000, seed=1):
        ours = clopper_pearson_lower(k, n, alpha)
        ref = float(proportion_confint(k, n, alpha=2 * alpha, method="beta")[0])
        assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12), (k, n, alpha)
        if k == 0:
            assert ours == 0.0
        if k == n:  # all hits: alpha^(1/n), the bound that caps the radius
            assert ours == pytest.approx(alpha ** (1 / n), rel=1e-9)


def test_clopper_pearson_upper_equals_statsmodels() -> None:
    for k, n, alpha in random_cases(3000, seed=2):
        ours = clopper_pearson_upper(k, n, alpha)
        ref = float(proportion_confint(k, n, alpha=2 * alpha, method="beta")[1])
        assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12), (k, n, alpha)
        if k == n:
            assert ours == 1.0


def test_clopper_pearson_bounds_meet_their_definition() -> None:
    """Lower bound L: P(Bin(n, L) >= k) = alpha. Upper bound U: P(Bin(n, U) <= k) = alpha."""
    for k, n, alpha in random_cases(500, seed=3):
        lo, hi = clopper_pearson_lower(k, n, alpha), clopper_pearson_upper(k, n, alpha)
        assert lo <= k / n <= hi
        if k > 0:
            assert binom.sf(k - 1, n, lo) == pytest.approx(alpha, rel=1e-6)
        if k < n:
            assert binom.cdf(k, n, hi) == pytest.approx(alpha, rel=1e-6)


# ---------------------------------------------------------------- coverage of CERTIFY


@pytest.mark.parametrize(
    ("p_a", "n", "alpha"), [(0.7, 200, 0.1), (0.6, 100, 0.1), (0.9, 500, 0.05)]
)
def test_certify_lower_bound_coverage(known_classifier, p_a: float, n: int, alpha: float) -> None:
    """pA_lower exceeds the true probability of the selected class about as often as exact CP.

    The selection uses n0 = 16 samples, so for pA = 0.6 the wrong class is sometimes selected;
    the selection samples are independent of the estimation samples, so each trial's failure
    probability is the exact CP exceedance probability of the class it selected.
    """
    sigma, trials = 0.5, 1500
    model, x = known_classifier([p_a, 1 - p_a], sigma)
    sampler = BatchSampler(model, 2, batch_size=1000)
    q_by_class = [exact_lower_exceeds(n, p, alpha) for p in (p_a, 1 - p_a)]
    assert q_by_class[0] <= alpha and q_by_class[1] <= alpha  # CP is valid...
    assert q_by_class[0] >= 0.75 * alpha  # ...and, at these n, not far from exact
    failures, expected = 0, []
    for seed in range(trials):
        cert = certify(sampler, x, sigma, n0=16, n=n, alpha=alpha, seed=seed)
        selected = selected_class(model, x, sigma, 16, seed)
        assert cert.abstained or cert.prediction == selected
        p_true = p_a if selected == 0 else 1 - p_a
        assert cert.pa_lower is not None
        failures += cert.pa_lower > p_true
        expected.append(q_by_class[selected])
    assert failures <= binomial_ceiling(trials, alpha)
    assert_count_matches(failures, expected, f"pA_lower > pA (pA={p_a}, n={n}, alpha={alpha})")


class LinearBinary(nn.Module):
    """f(x) = 1[w.x + b > 0]. Under N(0, sigma^2 I) noise f keeps its value at x with probability
    Phi(|w.x + b| / (sigma |w|)), so the exact certified radius is |w.x + b| / |w|."""

    w: Tensor

    def __init__(self, w: np.ndarray, b: float):
        super().__init__()
        self.register_buffer("w", torch.tensor(w, dtype=torch.float32))
        self.b = float(b)

    def forward(self, x: Tensor) -> Tensor:
        z = x.flatten(1) @ self.w + self.b
        return torch.stack([-z, z], dim=1)


def linear_point(
    rng: np.random.Generator, shape: tuple[int, ...], radius: float
) -> tuple[LinearBinary, Tensor, int]:
    """A random hyperplane at exactly L2 distance ``radius`` from a random x; returns f(x)."""
    d = int(np.prod(shape))
    w = rng.normal(size=d)
    x = rng.uniform(0, 1, size=d)
    sign = 1 if rng.random() < 0.5 else -1
    b = float(sign * radius * np.linalg.norm(w) - w @ x)
    x32 = torch.tensor(x, dtype=torch.float32).view(shape)
    return LinearBinary(w, b), x32, int(sign > 0)


def test_linear_classifier_radius_never_exceeds_the_exact_one() -> None:
    """Certified radius > |w.x+b|/|w| (or a wrong class) happens at the exact CP rate."""
    sigma, n, alpha, trials = 0.25, 300, 0.1, 800
    rng = np.random.default_rng(7)
    violations, expected = 0, []
    for seed in range(trials):
        p_a = float(rng.uniform(0.55, 0.995))
        true_radius = sigma * float(norm.ppf(p_a))
        model, x, label = linear_point(rng, (1, 2, 3), true_radius)
        cert = certify(BatchSampler(model, 2, batch_size=512), x, sigma, 16, n, alpha, seed)
        wrong_selection = selected_class(model, x, sigma, 16, seed) != label
        if cert.abstained:
            assert cert.radius == 0.0 and cert.prediction is None
        else:
            violations += cert.prediction != label or cert.radius > true_radius
        # A wrong selection is certified when its lower bound reaches 1/2; a right one
        # over-claims when its lower bound exceeds pA.
        expected.append(
            exact_lower_at_least_half(n, 1 - p_a, alpha)
            if wrong_selection
            else exact_lower_exceeds(n, p_a, alpha)
        )
    assert violations <= binomial_ceiling(trials, alpha)
    assert_count_matches(violations, expected, "certified beyond the exact radius")


@pytest.mark.parametrize("p_a", [0.7, 0.9, 0.99])
def test_linear_classifier_radius_is_tight_at_large_n(p_a: float) -> None:
    sigma, n, alpha = 0.5, 100_000, 1e-3
    true_radius = sigma * float(norm.ppf(p_a))
    model, x, label = linear_point(np.random.default_rng(11), (1, 2, 2), true_radius)
    cert = certify(BatchSampler(model, 2, batch_size=25_000), x, sigma, 100, n, alpha, seed=5)
    assert cert.prediction == label
    assert true_radius < cert.max_radius
    assert 0.95 * true_radius <= cert.radius <= true_radius


def test_top2_radius_on_two_classes_has_exact_alpha_half_coverage(known_classifier) -> None:
    """With two classes the top-2 radius is sigma * Phi^-1(pA_lower at alpha/2): over-claims at
    the exact CP rate for alpha/2, never more."""
    p_a, sigma, n, alpha, trials = 0.75, 0.5, 200, 0.2, 1000
    model, x = known_classifier([p_a, 1 - p_a], sigma)
    sampler = BatchSampler(model, 2, batch_size=1000)
    true_radius = sigma * float(norm.ppf(p_a))
    over, expected = 0, []
    for seed in range(trials):
        cert = certify(sampler, x, sigma, 32, n, alpha, seed, top2=True)
        if not cert.abstained:
            assert cert.prediction == 0  # P(wrong selection) ~ 1e-3 at n0=32: none at these seeds
            over += cert.radius > true_radius
        expected.append(exact_lower_exceeds(n, p_a, alpha / 2))
    assert over <= binomial_ceiling(trials, alpha / 2)
    assert_count_matches(over, expected, "top-2 radius beyond the exact one")


def test_top2_never_certifies_beyond_the_exact_two_class_radius(known_classifier) -> None:
    """Three classes with known (pA, pB): radius > sigma/2 (Phi^-1(pA) - Phi^-1(pB)) at most
    alpha of the time (the Bonferroni bounds are conservative, so typically far less)."""
    probs, sigma, n, alpha, trials = [0.55, 0.3, 0.15], 0.5, 200, 0.2, 1000
    model, x = known_classifier(probs, sigma)
    sampler = BatchSampler(model, 3, batch_size=1000)
    exact = 0.5 * sigma * float(norm.ppf(probs[0]) - norm.ppf(probs[1]))
    violations = issued = 0
    for seed in range(trials):
        cert = certify(sampler, x, sigma, 32, n, alpha, seed, top2=True)
        if not cert.abstained:
            issued += 1
            violations += cert.prediction != 0 or cert.radius > exact
    assert issued > trials // 2  # the test exercises certificates, not only abstentions
    assert violations <= binomial_ceiling(trials, alpha)


# ---------------------------------------------------------------- PREDICT


def test_predict_on_a_tie_errs_at_the_exact_binomial_test_rate(known_classifier) -> None:
    """A 50/50 classifier has no smoothed prediction: PREDICT answers at most alpha of the time."""
    sigma, n, alpha, trials = 0.5, 100, 0.1, 2000
    model, x = known_classifier([0.5, 0.5], sigma)
    sampler = BatchSampler(model, 2, batch_size=1000)
    answered = 0
    for seed in range(trials):
        cert = predict(sampler, x, sigma, n, alpha, seed)
        answered += not cert.abstained
    ks = np.arange(n + 1)
    rejects = np.array([binomtest(int(k), n, 0.5).pvalue <= alpha for k in ks])
    rate = float(binom.pmf(ks[rejects], n, 0.5).sum())
    assert rate <= alpha
    assert answered <= binomial_ceiling(trials, alpha)
    assert_count_matches(answered, [rate] * trials, "PREDICT answered on a tie")
