"""Merged selection (DECIDE with n0 = 0): its exact error by dynamic programming and its sample
cost by seeded simulation, shared by the statistical tests and ``python -m bench.boundaries``.

* :func:`exact_two_class` - two classes, the predictable class updated after **every** sample
  and a look after every sample (the most looks any schedule can have): the exact probabilities
  of each outcome by dynamic programming over (hits of class 0, predictable hits), no
  simulation. ``broken=True`` chooses the class with the current sample included (not
  predictable), the variant the proof forbids.
* :func:`simulate` - DECIDE's own schedule (:func:`models.sequential.merged_chunks`, the class
  fixed per chunk) and any number of classes, vectorised over seeded runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from models.sequential import (
    FIRST_LEADER,
    class_sequence,
    log_evidence_above,
    log_evidence_below,
    merged_chunks,
    merged_sequence,
)


@dataclass(frozen=True)
class Outcomes:
    """Probabilities (exact) or frequencies (simulated) of each way a run ends."""

    certified: np.ndarray  # per class: certified under that class's name
    not_certified: float
    undecided: float


def thresholds(alpha: float, p_star: float, n: int, num_classes: int) -> tuple[np.ndarray, ...]:
    """Per t = 0..n: fewest predictable hits that certify (over t - FIRST_LEADER trials), fewest
    hits of the top class its level-alpha/K sequence needs above 1 - p*, most hits of the top
    class that refute (-1: none). ``n + 2`` means never."""
    cs, per_class = merged_sequence(alpha), class_sequence(alpha, num_classes)
    cert_h = np.full(n + 1, n + 2)
    lead_k = np.full(n + 1, n + 2)
    refute_k = np.full(n + 1, -1)
    for t in range(1, n + 1):
        k = np.arange(t + 1)
        m = t - FIRST_LEADER
        if m >= 1:
            ok = log_evidence_above(np.arange(m + 1), m, p_star) >= cs.threshold
            cert_h[t] = int(np.argmax(ok)) if ok.any() else n + 2
        ok = log_evidence_above(k, t, 1 - p_star, per_class.above_prior) >= per_class.threshold
        lead_k[t] = int(np.argmax(ok)) if ok.any() else n + 2
        below = log_evidence_below(k, t, p_star) >= cs.threshold
        refute_k[t] = int(np.nonzero(below)[0].max()) if below.any() else -1
    return cert_h, lead_k, refute_k


def exact_two_class(
    p0: float,
    p_star: float,
    alpha: float,
    n: int,
    *,
    num_classes: int = 2,
    broken: bool = False,
    class_check: bool = True,
) -> Outcomes:
    """Exact outcome probabilities of merged DECIDE on two classes (P(class 0) = ``p0``), the
    predictable class (ties: class 0) updated and the decision checked after every sample, cap
    n. ``num_classes`` is the K of the alpha/K class sequences (the other classes never occur).
    ``class_check=False`` drops the returned class's own sequence from the rule (a variant the
    proof forbids).
    """
    cert_h, lead_k, refute_k = thresholds(alpha, p_star, n, num_classes)
    if not class_check:
        lead_k = np.zeros_like(lead_k)
    p1 = 1.0 - p0
    size = n + 2
    state = np.zeros((size, size))  # [hits of class 0, predictable hits]
    state[0, 0] = 1.0
    rows = np.arange(size)
    cert = np.zeros(2)
    refuted = 0.0
    for t in range(n):  # t samples drawn so far; draw sample t + 1
        w = t + 2  # active window of rows and columns
        src = state[:w, :w]
        new = np.zeros((size, size))
        if t < FIRST_LEADER:  # no class chosen yet: nothing tested
            new[1 : w + 1, :w] += p0 * src
            new[:w, :w] += p1 * src
        else:
            r = rows[:w, None]
            if broken:  # the class chosen with the sample counted (ties to the sample's class)
                hit0 = r + 1 >= t - r  # Y = 0: class 0 is a most frequent class afterwards
                hit1 = t - r + 1 >= r  # Y = 1: class 1 is
            else:
                hit0 = 2 * r >= t  # class 0 leads before the sample
                hit1 = ~hit0
            new[1 : w + 1, 1 : w + 1] += p0 * src * hit0
            new[1 : w + 1, :w] += p0 * src * ~hit0
            new[:w, 1 : w + 1] += p1 * src * hit1
            new[:w, :w] += p1 * src * ~hit1
        state = new
        t += 1
        k0 = rows[: t + 1]
        k_top = np.maximum(k0, t - k0)
        lead0 = k0 >= t - k0
        certify = (rows[None, : t + 1] >= cert_h[t]) & (k_top >= lead_k[t])[:, None]
        block = state[: t + 1, : t + 1]
        cert[0] += block[certify & lead0[:, None]].sum()
        cert[1] += block[certify & ~lead0[:, None]].sum()
        block[certify] = 0.0
        refute = k_top <= refute_k[t]
        refuted += block[refute, :].sum()
        block[refute, :] = 0.0
    return Outcomes(cert, refuted, float(state.sum()))


def simulate(
    probs: np.ndarray,
    p_star: float,
    alpha: float,
    n: int,
    runs: int,
    seed: int,
    *,
    broken: bool = False,
) -> tuple[Outcomes, np.ndarray]:
    """Merged DECIDE with its own chunk schedule on ``runs`` seeded runs of a base classifier
    with class probabilities ``probs``: (outcome frequencies, total samples of each run).
    ``broken=True`` tests each chunk against the class most frequent *after* it (not
    predictable)."""
    rng = np.random.default_rng(seed)
    probs = np.asarray(probs, float)
    k = probs.size
    cs = merged_sequence(alpha)
    cert_h, lead_k, refute_k = thresholds_at(alpha, p_star, n, k)
    counts = np.zeros((runs, k), dtype=np.int64)
    hits = np.zeros(runs, dtype=np.int64)
    active = np.ones(runs, dtype=bool)
    used = np.full(runs, n)
    outcome = np.full(runs, -1)  # class certified, k: not certified, -1: undecided
    t = 0
    for size in merged_chunks(cs, n, p_star, k):
        idx = np.nonzero(active)[0]
        if idx.size == 0:
            break
        leader = np.argmax(counts[idx], axis=1)  # first maximum: ties to the lower index
        chunk = rng.multinomial(size, probs, size=idx.size)
        if broken:
            leader = np.argmax(counts[idx] + chunk, axis=1)
        if t >= FIRST_LEADER:
            hits[idx] += chunk[np.arange(idx.size), leader]
        counts[idx] += chunk
        t += size
        top = np.argmax(counts[idx], axis=1)
        k_top = counts[idx, top]
        certify = (hits[idx] >= cert_h(t)) & (k_top >= lead_k(t))
        refute = ~certify & (k_top <= refute_k(t))
        done = certify | refute
        outcome[idx[certify]] = top[certify]
        outcome[idx[refute]] = k
        used[idx[done]] = t
        active[idx[done]] = False
    cert = np.array([(outcome == c).mean() for c in range(k)])
    return Outcomes(cert, float((outcome == k).mean()), float((outcome == -1).mean())), used


def thresholds_at(
    alpha: float, p_star: float, n: int, num_classes: int
) -> tuple[Callable[[int], int], Callable[[int], int], Callable[[int], int]]:
    """:func:`thresholds` evaluated lazily at the looks only (simulation at large n)."""
    cs, per_class = merged_sequence(alpha), class_sequence(alpha, num_classes)

    def first_k(pred: Callable[[int], bool], t: int) -> int:
        lo, hi = -1, t + 1  # pred monotone increasing in k
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if pred(mid) else (mid, hi)
        return hi if hi <= t else n + 2

    def cert_h(t: int) -> int:
        m = t - FIRST_LEADER
        return first_k(lambda h: m >= 1 and bool(cs.above(h, m, p_star)), m) if m >= 1 else n + 2

    def lead_k(t: int) -> int:
        return first_k(lambda kk: bool(per_class.above(kk, t, 1 - p_star)), t)

    def refute_k(t: int) -> int:
        first_not = first_k(lambda kk: not bool(cs.below(kk, t, p_star)), t)
        return min(first_not, t + 1) - 1

    return cert_h, lead_k, refute_k


def oracle_crossing(p: float, p_star: float, alpha: float, looks: list[int]) -> float:
    """Exact P(the one-sided level-alpha mixture on iid Bernoulli(``p``) hits, over
    t - FIRST_LEADER trials, lies above p* at some look t in ``looks``): the certification
    error of a test told the right class in advance. With predictable selection and every class's
    probability <= ``p``, the predictable hits can be coupled below such a sequence, so merged
    DECIDE's false "certified" rate is at most this (docs/DESIGN.md section 5)."""
    from scipy.stats import binom

    cs = merged_sequence(alpha)
    dist, prev, crossed = np.array([1.0]), 0, 0.0
    for t in looks:
        m = t - FIRST_LEADER
        if m <= prev:
            continue
        dist = np.convolve(dist, binom.pmf(np.arange(m - prev + 1), m - prev, p))
        prev = m
        above = log_evidence_above(np.arange(m + 1), m, p_star) >= cs.threshold
        crossed += dist[above].sum()
        dist = np.where(above, 0.0, dist)
    return float(crossed)


def simulate_every_sample(
    probs: np.ndarray,
    p_star: float,
    alpha: float,
    n: int,
    runs: int,
    seed: int,
    *,
    broken: bool = False,
) -> Outcomes:
    """Seeded runs of merged DECIDE with the class chosen before every sample and a look after
    every sample (any number of classes; the most looks any schedule can have). ``broken=True``
    counts a hit when the sample's class is a most frequent class with the sample counted (not
    predictable)."""
    rng = np.random.default_rng(seed)
    probs = np.asarray(probs, float)
    k = probs.size
    cert_h, lead_k, refute_k = thresholds(alpha, p_star, n, k)
    counts = np.zeros((runs, k), dtype=np.int64)
    hits = np.zeros(runs, dtype=np.int64)
    outcome = np.full(runs, -1)
    idx = np.arange(runs)
    cum = np.cumsum(probs)
    for t in range(1, n + 1):
        if idx.size == 0:
            break
        y = np.minimum(np.searchsorted(cum, rng.random(idx.size), side="right"), k - 1)
        if t > FIRST_LEADER:
            if broken:
                after = counts[idx].copy()
                after[np.arange(idx.size), y] += 1
                hit = after[np.arange(idx.size), y] >= after.max(axis=1)
            else:
                hit = np.argmax(counts[idx], axis=1) == y
            hits[idx] += hit
        counts[idx, y] += 1
        top = np.argmax(counts[idx], axis=1)
        k_top = counts[idx, top]
        certify = (hits[idx] >= cert_h[t]) & (k_top >= lead_k[t])
        refute = ~certify & (k_top <= refute_k[t])
        outcome[idx[certify]] = top[certify]
        outcome[idx[refute]] = k
        idx = idx[~(certify | refute)]
    cert = np.array([(outcome == c).mean() for c in range(k)])
    return Outcomes(cert, float((outcome == k).mean()), float((outcome == -1).mean()))
