"""Behaviour of CERTIFY / PREDICT a user relies on: reproducibility, fresh samples, abstentions,
the radius cap, the top-2 formula and parameter validation (docs/DESIGN.md section 2)."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint

from models.smoothing import (
    NOISE_BLOCK,
    AbstainReason,
    BatchSampler,
    NoiseStream,
    certify,
    max_radius,
    predict,
    validate,
)

SIGMA = 0.5


# ---------------------------------------------------------------- noise stream and reproducibility


def test_noise_stream_does_not_depend_on_how_it_is_taken() -> None:
    whole = NoiseStream(3, (1, 2, 2)).take(3 * NOISE_BLOCK + 5)
    stream = NoiseStream(3, (1, 2, 2))
    sizes = [1, 7, NOISE_BLOCK, NOISE_BLOCK - 8, 2 * NOISE_BLOCK]
    pieces: list[torch.Tensor] = []
    while sum(p.shape[0] for p in pieces) < whole.shape[0]:
        want = min(
            sizes[len(pieces) % len(sizes)], whole.shape[0] - sum(p.shape[0] for p in pieces)
        )
        pieces.append(stream.take(want))
    assert torch.equal(torch.cat(pieces), whole)
    assert whole.dtype == torch.float32 and whole.shape == (3 * NOISE_BLOCK + 5, 1, 2, 2)
    assert not torch.equal(NoiseStream(4, (1, 2, 2)).take(10), whole[:10])


def test_same_seed_gives_the_same_certificate(known_classifier) -> None:
    model, x = known_classifier([0.6, 0.3, 0.1], SIGMA)
    sampler = BatchSampler(model, 3, batch_size=100)
    first = certify(sampler, x, SIGMA, 50, 500, 0.01, seed=42)
    again = certify(sampler, x, SIGMA, 50, 500, 0.01, seed=42)
    assert first.counts == again.counts
    assert (first.prediction, first.radius, first.pa_lower) == (
        again.prediction,
        again.radius,
        again.pa_lower,
    )


def test_batch_size_does_not_change_the_counts(known_classifier) -> None:
    model, x = known_classifier([0.5, 0.3, 0.2], SIGMA)
    results = {
        b: certify(BatchSampler(model, 3, batch_size=b), x, SIGMA, 37, 300, 0.01, seed=9)
        for b in (1, 7, NOISE_BLOCK, NOISE_BLOCK + 1, 1000)
    }
    assert len({tuple(c.counts) for c in results.values()}) == 1
    assert len({c.radius for c in results.values()}) == 1
    predicted = {
        b: predict(BatchSampler(model, 3, batch_size=b), x, SIGMA, 300, 0.01, seed=9).counts
        for b in (1, 64, 1000)
    }
    assert len({tuple(c) for c in predicted.values()}) == 1


def test_different_seeds_give_different_counts(known_classifier) -> None:
    model, x = known_classifier([0.5, 0.3, 0.2], SIGMA)
    sampler = BatchSampler(model, 3)
    counts = {tuple(certify(sampler, x, SIGMA, 10, 1000, 0.01, seed=s).counts) for s in range(5)}
    assert len(counts) == 5


def test_estimation_uses_fresh_samples_after_the_selection_ones(known_classifier) -> None:
    """cA comes from the first n0 samples of the seed's stream, counts from the next n."""
    model, x = known_classifier([0.4, 0.35, 0.25], SIGMA)
    n0, n, seed = 20, 300, 5
    cert = certify(BatchSampler(model, 3, batch_size=64), x, SIGMA, n0, n, 0.2, seed, top2=True)
    stream = NoiseStream(seed, x.shape)
    with torch.no_grad():
        sel = torch.bincount(model(x + SIGMA * stream.take(n0)).argmax(1), minlength=3)
        est = torch.bincount(model(x + SIGMA * stream.take(n)).argmax(1), minlength=3)
    assert cert.counts == est.tolist() and sum(cert.counts) == n
    assert cert.count_a == int(est[int(sel.argmax())])
    assert cert.n0 == n0 and cert.n == n


def test_progress_reports_every_sample(known_classifier) -> None:
    model, x = known_classifier([0.9, 0.1], SIGMA)
    seen: list[int] = []
    certify(
        BatchSampler(model, 2, batch_size=64), x, SIGMA, 100, 1000, 0.01, 0, progress=seen.append
    )
    assert sum(seen) == 1100 and max(seen) <= 64


# ---------------------------------------------------------------- CERTIFY outcomes and the cap


def test_certify_abstains_when_pa_lower_is_below_half(known_classifier) -> None:
    model, x = known_classifier([0.5, 0.5], SIGMA)
    sampler = BatchSampler(model, 2)
    for seed in range(20):
        cert = certify(sampler, x, SIGMA, 100, 1000, 0.001, seed)
        assert cert.abstained and cert.abstain_reason == AbstainReason.PA_BELOW_HALF.value
        assert cert.prediction is None and cert.radius == 0.0
        assert cert.pa_lower is not None and cert.pa_lower < 0.5


def test_certify_certifies_a_clear_class_with_the_cohen_radius(known_classifier) -> None:
    model, x = known_classifier([0.02, 0.9, 0.08], SIGMA, shape=(3, 4, 4))
    cert = certify(BatchSampler(model, 3), x, SIGMA, 100, 2000, 0.001, seed=1)
    assert not cert.abstained and cert.prediction == 1 and cert.abstain_reason is None
    k = cert.counts[1]
    expected_pa = float(proportion_confint(k, 2000, alpha=0.002, method="beta")[0])
    assert cert.pa_lower == pytest.approx(expected_pa, rel=1e-9)
    assert cert.radius == pytest.approx(SIGMA * float(norm.ppf(expected_pa)), rel=1e-9)
    assert cert.input_shape == [3, 4, 4] and "[0,1]" in cert.space
    assert cert.to_dict()["radius"] == cert.radius


@pytest.mark.parametrize(
    ("n", "in_sigmas"), [(100, 1.50), (1000, 2.46), (10_000, 3.20), (100_000, 3.81), (10**6, 4.35)]
)
def test_max_radius_matches_the_design_table(n: int, in_sigmas: float) -> None:
    assert round(max_radius(1.0, n, 1e-3), 2) == in_sigmas
    assert max_radius(0.25, n, 1e-3) == pytest.approx(0.25 * max_radius(1.0, n, 1e-3))


def test_a_constant_classifier_reaches_exactly_the_cap(known_classifier) -> None:
    model, x = known_classifier([1.0, 0.0], SIGMA)
    cert = certify(BatchSampler(model, 2), x, SIGMA, 10, 1000, 1e-3, seed=0)
    assert cert.counts == [1000, 0] and cert.prediction == 0
    assert cert.radius == pytest.approx(cert.max_radius, rel=1e-12)
    assert cert.max_radius == pytest.approx(SIGMA * float(norm.ppf(1e-3 ** (1 / 1000))))


# ---------------------------------------------------------------- top-2 variant


def bonferroni_radius(counts: list[int], c_a: int, n: int, alpha: float) -> tuple[float, float]:
    """pA_lower at alpha/2, each other class's upper bound at alpha/(2(K-1)), by statsmodels."""
    others = [i for i in range(len(counts)) if i != c_a]
    per = alpha / (2 * len(others))
    pa = float(proportion_confint(counts[c_a], n, alpha=alpha, method="beta")[0])
    pb = max(
        float(proportion_confint(counts[i], n, alpha=2 * per, method="beta")[1]) for i in others
    )
    return pa, min(pb, 1 - pa)


def test_top2_matches_the_bonferroni_hand_computation(known_classifier) -> None:
    model, x = known_classifier([0.7, 0.2, 0.06, 0.04], SIGMA)
    sampler = BatchSampler(model, 4)
    for seed in range(10):
        cert = certify(sampler, x, SIGMA, 50, 500, 0.01, seed, top2=True)
        assert not cert.abstained and cert.prediction == 0
        pa, pb = bonferroni_radius(cert.counts, 0, 500, 0.01)
        assert cert.pa_lower == pytest.approx(pa, rel=1e-9)
        assert cert.pb_upper == pytest.approx(pb, rel=1e-9)
        radius = 0.5 * SIGMA * float(norm.ppf(pa) - norm.ppf(pb))
        assert cert.radius == pytest.approx(radius, rel=1e-9)
        assert cert.count_b == max(cert.counts[1:])


def test_top2_certifies_a_plurality_class_below_one_half(known_classifier) -> None:
    """With many classes pA < 1/2 can still be certified (pA_lower > pB_upper); the radius stays
    within the exact one for the true (pA, pB) and standard CERTIFY abstains."""
    probs = [0.45, 0.1, 0.1, 0.1, 0.1, 0.15]
    model, x = known_classifier(probs, SIGMA)
    sampler = BatchSampler(model, 6)
    cert = certify(sampler, x, SIGMA, 100, 3000, 0.01, seed=2, top2=True)
    assert not cert.abstained and cert.prediction == 0
    assert cert.pa_lower is not None and cert.pa_lower < 0.5
    pa, pb = bonferroni_radius(cert.counts, 0, 3000, 0.01)
    assert cert.radius == pytest.approx(0.5 * SIGMA * float(norm.ppf(pa) - norm.ppf(pb)), rel=1e-9)
    assert 0 < cert.radius <= 0.5 * SIGMA * float(norm.ppf(0.45) - norm.ppf(0.15))
    standard = certify(sampler, x, SIGMA, 100, 3000, 0.01, seed=2)
    assert standard.abstained and standard.abstain_reason == AbstainReason.PA_BELOW_HALF.value


def test_top2_abstains_when_the_bounds_overlap(known_classifier) -> None:
    model, x = known_classifier([0.45, 0.44, 0.11], SIGMA)
    sampler = BatchSampler(model, 3)
    for seed in range(10):
        cert = certify(sampler, x, SIGMA, 50, 300, 0.01, seed, top2=True)
        assert cert.abstained and cert.abstain_reason == AbstainReason.PA_NOT_ABOVE_PB.value
        assert cert.prediction is None and cert.radius == 0.0
        assert cert.pa_lower is not None and cert.pb_upper is not None
        assert cert.pa_lower <= cert.pb_upper


# ---------------------------------------------------------------- PREDICT


def test_predict_abstains_on_a_tie_and_answers_a_clear_class(known_classifier) -> None:
    tie, x = known_classifier([0.5, 0.5], SIGMA)
    cert = predict(BatchSampler(tie, 2), x, SIGMA, 1000, 0.001, seed=3)
    assert cert.abstained and cert.abstain_reason == AbstainReason.NOT_SIGNIFICANT.value
    assert cert.prediction is None and cert.radius == 0.0
    assert abs(cert.counts[0] - cert.counts[1]) < 100  # ~ equal
    clear, x = known_classifier([0.1, 0.2, 0.7], SIGMA)
    cert = predict(BatchSampler(clear, 3), x, SIGMA, 1000, 0.001, seed=3)
    assert not cert.abstained and cert.prediction == 2 and cert.abstain_reason is None
    assert cert.pvalue is not None and cert.pvalue <= 0.001


def test_predict_agrees_with_scipy_binomtest(known_classifier) -> None:
    model, x = known_classifier([0.45, 0.38, 0.17], SIGMA)
    sampler = BatchSampler(model, 3)
    outcomes = set()
    for seed in range(60):
        cert = predict(sampler, x, SIGMA, 400, 0.05, seed)
        ranked = sorted(range(3), key=lambda i: -cert.counts[i])
        c1, c2 = cert.counts[ranked[0]], cert.counts[ranked[1]]
        assert (cert.count_a, cert.count_b) == (c1, c2)
        pvalue = binomtest(c1, c1 + c2, 0.5).pvalue
        assert cert.pvalue == pytest.approx(pvalue, rel=1e-12)
        assert cert.abstained == (pvalue > 0.05)
        assert cert.prediction == (None if cert.abstained else ranked[0])
        outcomes.add(cert.abstained)
    assert outcomes == {True, False}  # both branches were exercised


# ---------------------------------------------------------------- parameter validation


@pytest.mark.parametrize(
    ("sigma", "alpha", "n", "n0", "word"),
    [
        (0.0, 0.001, 100, 10, "sigma"),
        (-0.25, 0.001, 100, 10, "sigma"),
        (math.nan, 0.001, 100, 10, "sigma"),
        (math.inf, 0.001, 100, 10, "sigma"),
        (0.25, 0.0, 100, 10, "alpha"),
        (0.25, 0.5, 100, 10, "alpha"),
        (0.25, -0.1, 100, 10, "alpha"),
        (0.25, 1.0, 100, 10, "alpha"),
        (0.25, math.nan, 100, 10, "alpha"),
        (0.25, 0.001, 0, 10, "n "),
        (0.25, 0.001, -5, 10, "n "),
        (0.25, 0.001, 2.5, 10, "n "),
        (0.25, 0.001, 100.0, 10, "n "),  # a float would fail later, mid-sampling
        (0.25, 0.001, math.nan, 10, "n "),
        (0.25, 0.001, math.inf, 10, "n "),
        (0.25, 0.001, 100, 0, "n0"),
        (0.25, 0.001, 100, math.inf, "n0"),
    ],
)
def test_validate_rejects_unusable_parameters(
    sigma: float, alpha: float, n: float, n0: float, word: str
) -> None:
    with pytest.raises(ValueError, match=word):
        validate(sigma, alpha, n, n0)  # type: ignore[arg-type]


def test_certify_and_predict_validate_before_sampling(known_classifier) -> None:
    model, x = known_classifier([0.9, 0.1], SIGMA)
    calls: list[int] = []
    with pytest.raises(ValueError, match="alpha"):
        certify(BatchSampler(model, 2), x, SIGMA, 10, 100, 0.7, 0, progress=calls.append)
    with pytest.raises(ValueError, match="sigma"):
        predict(BatchSampler(model, 2), x, -1.0, 100, 0.01, 0, progress=calls.append)
    assert calls == []
    validate(0.25, 0.001, 100_000, 100)  # the published setting is accepted
