"""Statistical tests of the anytime-valid confidence sequence and of DECIDE (models/sequential.py).

* The closed forms agree with the mixtures' definitions (numerical integration) and the bounds
  with a brute-force scan over p.
* Time-uniform validity, exactly: the probability that a sequence ever excludes the true pA
  (every sample looked at) or that DECIDE ever errs (its own looks) is computed by dynamic
  programming over the binomial counts, and is <= alpha.
* Simulation: >= 20,000 seeded runs with pA just below / just above p*, the decision checked
  after every chunk; observed false decisions <= alpha (+ sampling error) and within Z_TOL sd
  of the exact expectation; the same with DECIDE end to end on a classifier with known pA.
* Teeth: the same checks fail when the sequence is replaced by a fixed-n Clopper-Pearson bound
  re-checked after each chunk.

Sizes are CI-sized; ``DMAE_LONG_STATS=1`` runs the long form (10x the simulated runs, 20,000
end-to-end DECIDE runs per direction) and prints the figures (``pytest -s``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import KnownProbabilityClassifier
from scipy import integrate
from scipy.stats import beta, binom, norm

from models.sequential import (
    ABOVE_PRIOR,
    BELOW_PRIOR,
    MIN_CHUNK,
    ConfidenceSequence,
    Decision,
    chunk_sizes,
    decision,
    decision_chunks,
    log_evidence_above,
    log_evidence_below,
)
from models.smoothing import BatchSampler, decide

LONG = os.environ.get("DMAE_LONG_STATS", "") not in ("", "0")
SIM_RUNS = 200_000 if LONG else 20_000
E2E_RUNS = 20_000 if LONG else 600
Z_TOL = 4.0  # seeded; a correct implementation misses by chance with odds < 1e-4
P_STAR = float(norm.cdf(1.0))  # target radius = sigma: p* = Phi(1)

Thresholds = tuple[np.ndarray, np.ndarray]  # per look: smallest k that certifies, largest refuting


def binomial_ceiling(trials: int, rate: float) -> int:
    """Largest count still compatible (odds 1e-5) with a true rate of ``rate``."""
    return int(binom.ppf(1 - 1e-5, trials, rate))


def assert_count_matches(observed: int, trials: int, rate: float, what: str) -> None:
    sd = math.sqrt(trials * rate * (1 - rate))
    assert abs(observed - trials * rate) <= Z_TOL * sd + 1, (
        f"{what}: observed {observed} of {trials}, exact expectation {trials * rate:.1f}"
    )


def report(what: str, observed: int, trials: int, exact: float, alpha: float) -> None:
    if LONG:
        print(f"\n{what}: {observed}/{trials} = {observed / trials:.5f} (exact {exact:.5f}, "
              f"alpha {alpha})")  # fmt: skip


# ---------------------------------------------------------------- thresholds and exact DP


def cs_thresholds(cs: ConfidenceSequence, looks: np.ndarray, p: float) -> Thresholds:
    """Per look t: smallest k with the sequence above p (t + 1: none), largest with it below."""
    up, down = [], []
    for t in looks:
        ks = np.arange(t + 1)
        above = np.flatnonzero(cs.above(ks, t, p))
        below = np.flatnonzero(cs.below(ks, t, p))
        up.append(above[0] if above.size else t + 1)
        down.append(below[-1] if below.size else -1)
    return np.array(up), np.array(down)


def recheck_cp_thresholds(alpha: float, looks: np.ndarray, p: float) -> Thresholds:
    """The broken alternative: a fixed-n one-sided Clopper-Pearson bound at each look."""
    up, down = [], []
    for t in looks:
        ks = np.arange(t + 1)
        lower = np.where(ks > 0, beta.ppf(alpha, np.maximum(ks, 1), t - ks + 1), 0.0)
        upper = np.where(ks < t, beta.ppf(1 - alpha, ks + 1, np.maximum(t - ks, 1)), 1.0)
        above, below = np.flatnonzero(lower > p), np.flatnonzero(upper < p)
        up.append(above[0] if above.size else t + 1)
        down.append(below[-1] if below.size else -1)
    return np.array(up), np.array(down)


def exact_crossing(looks: np.ndarray, thresholds: Thresholds, p: float) -> tuple[float, float]:
    """P(k_t >= up_t at some look, first), P(k_t <= down_t at some look, first), k_t ~ Bin(t, p).

    Dynamic programming over the distribution of k among runs that have not stopped yet.
    """
    dist, prev, hit_up, hit_down = np.array([1.0]), 0, 0.0, 0.0
    for t, up, down in zip(looks, *thresholds, strict=True):
        step = int(t - prev)
        dist = np.convolve(dist, binom.pmf(np.arange(step + 1), step, p))
        prev = t
        ks = np.arange(dist.size)
        hit_up += dist[ks >= up].sum()
        hit_down += dist[ks <= down].sum()
        dist = np.where((ks >= up) | (ks <= down), 0.0, dist)
    return float(hit_up), float(hit_down)


def decide_looks(alpha: float, n: int, p_star: float = P_STAR) -> np.ndarray:
    return np.cumsum(list(decision_chunks(ConfidenceSequence(alpha), n, p_star)))


def simulate_decisions(
    looks: np.ndarray, thresholds: Thresholds, p: float, runs: int, seed: int
) -> tuple[int, int, np.ndarray]:
    """Seeded runs of the sequential decision on binomial counts drawn chunk by chunk.

    Returns (runs certified, runs refuted, samples used per run).
    """
    rng = np.random.default_rng(seed)
    k = np.zeros(runs, dtype=np.int64)
    state = np.zeros(runs, dtype=np.int8)  # 0 sampling, 1 certified, -1 refuted
    used = np.full(runs, looks[-1])
    prev = 0
    for t, up, down in zip(looks, *thresholds, strict=True):
        live = state == 0
        k[live] += rng.binomial(int(t - prev), p, size=int(live.sum()))
        prev = t
        cert, ref = live & (k >= up), live & (k <= down)
        state[cert], state[ref] = 1, -1
        used[cert | ref] = t
    return int((state == 1).sum()), int((state == -1).sum()), used


# ---------------------------------------------------------------- closed forms vs definitions


def mixture_by_quadrature(k: int, t: int, p: float, side: str, prior: float) -> float:
    """M+_t(p) or M-_t(p) from the definition: the prior-weighted likelihood ratio, integrated
    piecewise around the likelihood's peak (width ~ 1/sqrt(t))."""

    def ratio(q: float) -> float:
        return math.exp(
            k * (math.log(q) - math.log(p)) + (t - k) * (math.log1p(-q) - math.log1p(-p))
        )

    if side == "above":  # (1 - Q)/(1 - p) ~ Beta(prior, 1) on Q in (p, 1)
        lo, hi = p, 1.0

        def density(q: float) -> float:
            return prior * (1 - q) ** (prior - 1) / (1 - p) ** prior
    else:  # Q/p ~ Beta(prior, 1) on Q in (0, p)
        lo, hi = 0.0, p

        def density(q: float) -> float:
            return prior * q ** (prior - 1) / p**prior

    mode = k / t
    sd = math.sqrt(mode * (1 - mode) / t) + 1 / t
    cuts = {lo, hi, *(mode + j * sd for j in (-100, -30, -10, -3, 0, 3, 10, 30, 100))}
    edges = sorted(c for c in cuts if lo <= c <= hi)
    inside = [lo + (hi - lo) * f for f in (0.001, 0.5, 0.999)] + [c for c in edges if lo < c < hi]
    scale = max(ratio(q) for q in inside) * min(sd, hi - lo)  # the absolute accuracy wanted
    return sum(
        integrate.quad(
            lambda q: ratio(q) * density(q), a, b, epsabs=1e-13 * scale, epsrel=1e-10, limit=500
        )[0]
        for a, b in zip(edges[:-1], edges[1:], strict=False)
    )


def test_closed_forms_equal_the_mixture_integrals() -> None:
    rng = np.random.default_rng(1)
    cases = [(0, 1, 0.5), (1, 1, 0.5), (0, 10, 0.2), (10, 10, 0.9), (47, 47, P_STAR)]
    for _ in range(60):
        t = int(rng.integers(1, 400))
        k = int(rng.integers(0, t + 1))
        p = float(np.clip(k / t + rng.normal(0, 0.1), 0.01, 0.99))
        cases.append((k, t, p))
    for k, t, p in cases:
        for prior in (0.5, 1.0, 2.0):
            got = math.exp(log_evidence_above(k, t, p, prior))
            assert got == pytest.approx(mixture_by_quadrature(k, t, p, "above", prior), rel=1e-6)
            got = math.exp(log_evidence_below(k, t, p, prior))
            assert got == pytest.approx(mixture_by_quadrature(k, t, p, "below", prior), rel=1e-6)
    assert log_evidence_above(0, 0, 0.3) == pytest.approx(0.0)  # M_0 = 1
    assert log_evidence_below(0, 0, 0.3) == pytest.approx(0.0)


def assert_monotone(values: np.ndarray, direction: int) -> None:
    """Nondecreasing (+1) or nonincreasing (-1) up to float noise; -inf counts as very small."""
    v = direction * np.where(np.isneginf(values), -1e300, values)
    assert np.all(np.diff(v) >= -1e-9 * np.maximum(1, np.abs(v[1:])))


def test_bounds_equal_a_brute_force_scan_over_p() -> None:
    """L_t is where the scanned evidence first drops below 1/alpha (U_t: last rises above it).
    The evidence is monotone in p where it can exclude values (p < k/t for the lower side, p >
    k/t for the upper) and at most 1 elsewhere, so each side's set is an interval."""
    grid = np.linspace(0, 1, 20_001)[1:-1]
    rng = np.random.default_rng(2)
    cases = [(0, 5), (5, 5), (1, 1), (3, 40), (39, 40), (900, 1000), (9990, 10_000), (50, 100)]
    cases += [(int(rng.integers(0, t + 1)), t) for t in rng.integers(1, 3000, size=25)]
    for k, t in cases:
        ev_up, ev_down = log_evidence_above(k, t, grid), log_evidence_below(k, t, grid)
        left = grid < k / t
        assert_monotone(ev_up[left], -1)
        assert_monotone(ev_down[~left & (grid != k / t)], +1)
        assert np.all(ev_up[~left] <= 0) and np.all(ev_down[grid <= k / t] <= 0)
        for alpha in (0.001, 0.05, 0.3):
            cs = ConfidenceSequence(alpha)
            kept = grid[ev_up < cs.threshold]
            lower = cs.lower(k, t)
            assert kept.size and lower <= kept[0] and kept[0] - lower <= 1e-4
            assert lower == 0.0 or cs.above(k, t, lower)  # rounded to the safe side
            kept = grid[ev_down < cs.threshold]
            upper = cs.upper(k, t)
            assert upper >= kept[-1] and upper - kept[-1] <= 1e-4
            assert upper == 1.0 or cs.below(k, t, upper)
            assert lower <= k / t <= upper


def test_scalar_and_vector_evaluations_agree() -> None:
    """The scalar fast path (per look) and the numpy path (tests, thresholds) are one formula."""
    rng = np.random.default_rng(5)
    t = rng.integers(0, 5000, size=400)
    k = (rng.random(400) * (t + 1)).astype(int)
    p = np.concatenate(
        [rng.random(390), [0.0, 0.0, 0.5, 0.999999, 1e-300, 0.3, 0.7, 0.2, 0.9, 1e-9]]
    )
    for i in range(400):
        if p[i] < 1:
            want = float(log_evidence_above(k[i : i + 1], t[i : i + 1], p[i : i + 1])[0])
            got = log_evidence_above(int(k[i]), int(t[i]), float(p[i]))
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12) or got == want
        q = 1 - p[i]
        if q > 0:
            want = float(log_evidence_below(k[i : i + 1], t[i : i + 1], q[None])[0])
            got = log_evidence_below(int(k[i]), int(t[i]), float(q))
            assert got == pytest.approx(want, rel=1e-12, abs=1e-12) or got == want


def test_closed_forms_at_large_t_equal_the_mixture_integrals() -> None:
    """Where the bounds and decisions of n = 10^3..10^6 samples are taken (near the roots) the
    closed forms agree with the integrals to 1e-7 in log."""
    cs = ConfidenceSequence(0.001)
    for k, t in [(990, 1000), (9_000, 10_000), (99_990, 100_000), (999_000, 1_000_000)]:
        lower, upper = cs.lower(k, t), cs.upper(k, t)
        for p in (lower, 0.5 * (lower + k / t)):
            want = math.log(mixture_by_quadrature(k, t, p, "above", ABOVE_PRIOR))
            assert float(log_evidence_above(k, t, p)) == pytest.approx(want, abs=1e-7)
        for p in (upper, 0.5 * (upper + k / t)):
            want = math.log(mixture_by_quadrature(k, t, p, "below", BELOW_PRIOR))
            assert float(log_evidence_below(k, t, p)) == pytest.approx(want, abs=1e-7)


def test_bounds_are_somewhat_wider_than_clopper_pearson() -> None:
    """The price of time-uniformity: at a fixed n and alpha = 0.001 the lower bound sits 1.15-1.5
    times as far below k/n as the fixed-n Clopper-Pearson bound."""
    cs = ConfidenceSequence(0.001)
    for k, t in [(9000, 10_000), (99_000, 100_000), (10_000, 10_000), (500, 1000), (100, 100)]:
        cp = float(beta.ppf(0.001, k, t - k + 1))
        assert 1.1 < (k / t - cs.lower(k, t)) / (k / t - cp) < 1.5


def test_decision_function_reads_the_two_sides() -> None:
    cs = ConfidenceSequence(0.05)
    assert decision(cs, 30, 30, 30, P_STAR) is Decision.CERTIFIED
    assert decision(cs, 0, 30, 30, P_STAR) is None  # selected class never seen, top class is
    assert decision(cs, 10, 12, 30, P_STAR) is Decision.NOT_CERTIFIED
    assert decision(cs, 0, 0, 0, P_STAR) is None


def test_chunk_schedule() -> None:
    sizes = list(chunk_sizes(10_000, 47))
    assert sum(sizes) == 10_000 and sizes[0] == 47
    assert all(s >= MIN_CHUNK for s in sizes)
    looks = np.cumsum(sizes)
    growth = looks[1:] / looks[:-1]
    assert growth.max() <= 1.25 + MIN_CHUNK / 47 + 1e-9 and len(sizes) < 30
    assert np.cumsum(list(chunk_sizes(1000, 32, look_at=47)))[:3].tolist() == [32, 47, 79]
    assert list(chunk_sizes(40, 32)) == [40]  # no tiny last chunk
    with pytest.raises(ValueError):
        list(chunk_sizes(10, 5, growth=1.0))


# ---------------------------------------------------------------- time-uniform coverage


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_sequence_covers_pa_at_every_sample_count(p: float) -> None:
    """P(L_t > pA for some t <= T) <= alpha and P(U_t < pA for some t) <= alpha: exactly (DP,
    every sample a look) and in 20,000 simulated paths; a fixed-n CP bound re-checked at every
    t misses pA far more often than alpha."""
    alpha, horizon = 0.05, 1000
    cs = ConfidenceSequence(alpha)
    looks = np.arange(1, horizon + 1)
    thresholds = cs_thresholds(cs, looks, p)
    exact_up, exact_down = exact_crossing(looks, thresholds, p)
    assert exact_up <= alpha and exact_down <= alpha
    rng = np.random.default_rng(int(p * 1000))
    runs = SIM_RUNS
    missed_low = missed_high = 0
    for start in range(0, runs, 5000):
        size = min(5000, runs - start)
        k = np.cumsum(rng.random((size, horizon), dtype=np.float32) < p, axis=1)
        missed_low += int(np.any(k >= thresholds[0], axis=1).sum())
        missed_high += int(np.any(k <= thresholds[1], axis=1).sum())
    for observed, exact, side in ((missed_low, exact_up, "L_t > pA"), (missed_high, exact_down,
                                                                     "U_t < pA")):  # fmt: skip
        report(f"coverage p={p}: {side} at some t <= {horizon}", observed, runs, exact, alpha)
        assert observed <= binomial_ceiling(runs, alpha)
        assert_count_matches(observed, runs, exact, f"{side} at some t (p={p})")
    cp_up, cp_down = exact_crossing(looks, recheck_cp_thresholds(alpha, looks, p), p)
    if LONG:
        print(f"\nfixed-n CP re-checked at every t <= {horizon}, p={p}: exact miss rates "
              f"{cp_up:.4f} (lower), {cp_down:.4f} (upper)")  # fmt: skip
    assert cp_up > 2 * alpha and cp_down > 2 * alpha  # the check has teeth


# ---------------------------------------------------------------- the decision, simulated


@pytest.mark.parametrize(("shift", "wrong"), [(-0.002, "certified"), (0.002, "not_certified")])
def test_false_decision_rate_with_a_look_after_every_chunk(shift: float, wrong: str) -> None:
    """pA just below p*: certifying is the error; just above: refuting is. Exact (DP over
    DECIDE's own looks) and simulated rates are <= alpha; the fixed-n CP re-checked after every
    chunk errs several times more often than alpha (teeth)."""
    alpha, n = 0.05, 2000
    p = P_STAR + shift
    looks = decide_looks(alpha, n)
    cs_t = cs_thresholds(ConfidenceSequence(alpha), looks, P_STAR)
    exact = exact_crossing(looks, cs_t, p)[0 if wrong == "certified" else 1]
    cert, ref, _ = simulate_decisions(looks, cs_t, p, SIM_RUNS, seed=3)
    observed = cert if wrong == "certified" else ref
    report(f"pA = p* {shift:+}: {wrong}", observed, SIM_RUNS, exact, alpha)
    assert exact <= alpha
    assert observed <= binomial_ceiling(SIM_RUNS, alpha)
    assert_count_matches(observed, SIM_RUNS, exact, f"{wrong} at pA = p* {shift:+}")

    cp_t = recheck_cp_thresholds(alpha, looks, P_STAR)
    cert, ref, _ = simulate_decisions(looks, cp_t, p, SIM_RUNS, seed=3)
    broken = cert if wrong == "certified" else ref
    broken_exact = exact_crossing(looks, cp_t, p)[0 if wrong == "certified" else 1]
    report(
        f"fixed-n CP re-checked, pA = p* {shift:+}: {wrong}", broken, SIM_RUNS, broken_exact, alpha
    )
    assert broken > binomial_ceiling(SIM_RUNS, alpha)  # the same check fails on the broken rule
    assert broken_exact > 3 * alpha


def test_sample_counts_follow_the_exact_distribution() -> None:
    """Mean samples used in simulation = the DP's expectation (the schedule is what it claims)."""
    alpha, n, p = 0.001, 10_000, 0.95
    looks = decide_looks(alpha, n)
    thresholds = cs_thresholds(ConfidenceSequence(alpha), looks, P_STAR)
    _, _, used = simulate_decisions(looks, thresholds, p, 20_000, seed=4)
    dist, prev, expected, alive = np.array([1.0]), 0, 0.0, 1.0
    for t, up, down in zip(looks, *thresholds, strict=True):
        dist = np.convolve(dist, binom.pmf(np.arange(t - prev + 1), t - prev, p))
        prev = t
        ks = np.arange(dist.size)
        stop = (ks >= up) | (ks <= down)
        expected += t * dist[stop].sum()
        alive -= dist[stop].sum()
        dist = np.where(stop, 0.0, dist)
    expected += n * alive
    assert used.mean() == pytest.approx(expected, rel=0.02)
    assert np.median(used) < 300  # pA = 0.95 against p* = 0.841 at alpha = 0.001


# ---------------------------------------------------------------- DECIDE end to end


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The known classifier's forward is a bucketize of a few hundred numbers: threads only add
    contention on a busy machine (10x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_decide(
    probs: list[float], runs: int, n0: int, n: int, alpha: float, first_seed: int = 0
) -> list:
    sigma = 0.25
    model = KnownProbabilityClassifier(probs, sigma)
    sampler = BatchSampler(model, len(probs), batch_size=4096)
    x = torch.zeros(1, 2, 2)
    return [
        decide(sampler, x, sigma, sigma, n0, n, alpha, seed)  # target = sigma: p* = Phi(1)
        for seed in range(first_seed, first_seed + runs)
    ]


def selection_probability(p_a: float, n0: int) -> float:
    """P(class 0 is selected on n0 samples) for two classes (ties go to the lower index)."""
    ks = np.arange(n0 + 1)
    return float(binom.pmf(ks[2 * ks >= n0], n0, p_a).sum())


@pytest.mark.parametrize(("shift", "wrong"), [(-0.002, "certified"), (0.002, "not_certified")])
def test_decide_end_to_end_false_decision_rate(shift: float, wrong: str) -> None:
    """DECIDE on a base classifier with known pA: false decisions at the exact DP rate (which
    is <= alpha), counting both selections of the class (n0 = 4 errs now and then)."""
    alpha, n, n0 = 0.1, 2000, 4
    p = P_STAR + shift
    certs = run_decide([p, 1 - p], E2E_RUNS, n0, n, alpha)
    observed = sum(c.decision == wrong for c in certs)
    looks = decide_looks(alpha, n)
    thresholds = cs_thresholds(ConfidenceSequence(alpha), looks, P_STAR)
    right = selection_probability(p, n0)
    if wrong == "certified":  # the selected class's count is compared with p*
        exact = (
            right * exact_crossing(looks, thresholds, p)[0]
            + (1 - right) * exact_crossing(looks, thresholds, 1 - p)[0]
        )
    else:  # the most frequent class's count (almost surely class 0's: pA ~ 0.84)
        exact = exact_crossing(looks, thresholds, p)[1]
    report(f"decide() pA = p* {shift:+}: {wrong}", observed, E2E_RUNS, exact, alpha)
    assert exact <= alpha
    assert observed <= binomial_ceiling(E2E_RUNS, alpha)
    assert_count_matches(observed, E2E_RUNS, exact, f"decide(): {wrong}")
    for c in certs:
        assert c.n_used in set(looks.tolist()) and sum(c.counts) == c.n_used
        assert c.decision != "undecided" or c.n_used == n


def test_wrong_selection_cannot_make_a_robust_input_not_certified() -> None:
    """n0 = 1 selects the wrong class 10% of the time. Refuting on the *selected* class would
    then say "not certified" for a smoothed classifier whose radius is above the target; DECIDE
    refutes only when the most frequent class is below p*, so that error stays <= alpha."""
    alpha, n, runs = 0.05, 2000, 300
    p = 0.9  # radius sigma * Phi^-1(0.9) = 1.28 sigma > target sigma
    certs = run_decide([p, 1 - p], runs, 1, n, alpha, first_seed=100)
    wrong_selection = [c for c in certs if c.count_a < c.n_used / 2]
    assert len(wrong_selection) >= 15  # the scenario happens (10% of the runs)
    refuted = sum(c.decision == "not_certified" for c in certs)
    assert refuted <= binomial_ceiling(runs, alpha)
    for c in wrong_selection:
        assert c.decision == "undecided" and c.n_used == n  # never certified, never refuted


def test_a_near_certain_input_is_certified_within_500_samples() -> None:
    """pA = 0.999, sigma = target = 0.25, alpha = 0.05, n0 = 20: certified with n0 + n_used
    <= 500 on every seed tried, and the exact chance of needing more is negligible."""
    alpha, n0, n, p = 0.05, 20, 10_000, 0.999
    certs = run_decide([p, 1 - p], 200, n0, n, alpha)
    assert all(c.decision == "certified" for c in certs)
    assert max(n0 + c.n_used for c in certs) <= 500
    looks = decide_looks(alpha, n)
    early = looks[looks <= 500 - n0]
    thresholds = cs_thresholds(ConfidenceSequence(alpha), early, P_STAR)
    certified_by_480 = exact_crossing(early, thresholds, p)[0]
    assert 1 - certified_by_480 < 1e-9
