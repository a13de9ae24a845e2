"""Anytime-valid (time-uniform) confidence sequences for a binomial proportion pA.

A confidence sequence (CS) is a sequence of sets C_1, C_2, ... with
P(pA in C_t for every t = 1, 2, ...) >= 1 - alpha (Howard, Ramdas, McAuliffe, Sekhon,
"Time-uniform, nonparametric, nonasymptotic confidence sequences", Ann. Statist. 2021). It may
be checked after every sample and sampling stopped whenever it says enough, at a time that
depends on the data, and the bound at that time is still valid: this is what makes early
stopping of randomized smoothing sound. Re-checking a fixed-n Clopper-Pearson bound after each
chunk is not (its error grows with the number of looks).

Boundary used here: one-sided conjugate (beta-binomial) mixtures of likelihood ratios, one per
side, in closed form. With k hits in t Bernoulli(pA) samples and l(q) = q^k (1 - q)^(t - k):

* lower side, "pA > p": M+_t(p) = E[l(Q) / l(p) | Q > p] where (1 - Q) / (1 - p) ~ Beta(b, 1),
  b = 1/2 (density proportional to (1 - q)^(b - 1) on (p, 1)). Closed form::

      M+_t(p) = b B(k + 1, t - k + b) I^c_p(k + 1, t - k + b) / ((1 - p)^b l(p))

* upper side, "pA < p": M-_t(p) = E[l(Q) / l(p) | Q < p] where Q / p ~ Beta(a, 1), a = 1
  (uniform on (0, p))::

      M-_t(p) = a B(k + a, t - k + 1) I_p(k + a, t - k + 1) / (p^a l(p))

B is the beta function, I_p the regularized incomplete beta function, I^c_p = 1 - I_p. Each
mixture component l(q) / l(p) is a nonnegative martingale under pA = p (M_0 = 1) and a
supermartingale under every pA on the other side of p, so by Ville's inequality
P(exists t: M+_t(p) >= 1/alpha) <= alpha for every pA <= p, and likewise for M-. The lower
bound L_t = inf {p : M+_t(p) < 1/alpha} therefore satisfies P(exists t: L_t > pA) <= alpha, and
the upper bound U_t = sup {p : M-_t(p) < 1/alpha} satisfies P(exists t: U_t < pA) <= alpha. The
prior is a scale family anchored at p (the law of (1 - Q)/(1 - p), resp. Q/p, does not depend
on p), which makes M+ nonincreasing and M- nondecreasing in p: each side's set is an interval,
L_t and U_t are single roots (Brent's method, rounded to the safe side), and "the sequence
lies entirely above p*" is one closed-form evaluation, M+_t(p*) >= 1/alpha.

Why this boundary (sample complexity of the decision "pA > p*?"): expected samples to a
decision at alpha = 0.001, n = 10,000, computed exactly by dynamic programming over the
binomial counts (``python -m bench.boundaries``; table in docs/PERFORMANCE.md), with looks
every 2% of the samples drawn and with DECIDE's own looks. Against the two-sided beta-binomial
mixture with the Jeffreys prior (the Krichevsky-Trofimov plug-in bettor, i.e. the betting CS
with KT bets, the kind of sequence Voracek, NeurIPS 2024, arXiv 2406.17830, builds this
decision on) the one-sided mixtures spend their whole prior on the side a decision needs:
easy certifications are 15-25% shorter (pA = 1: 47 vs 56 samples at p* = Phi(1), 358 vs 461
at p* = Phi(2)), harder certifications up to 25% shorter, and refutations within 4% either
way. Against Clopper-Pearson with alpha split over the
looks (Bonferroni, Horvath et al., ICLR 2022) it needs 35-55% fewer samples with dense looks;
with DECIDE's 24 geometric looks the two are close where the answer is "not certified"
(Bonferroni a few percent ahead) while easy certifications take 47 vs 75 samples, and the
Bonferroni bounds hold only at the pre-set looks, whereas this sequence holds at every t,
which the time-budget stop of CERTIFY (any t) needs. The prior b = 1/2 puts more mass near
pA = 1 than the uniform one (b = 1), where a working classifier's pA concentrates: 13% fewer
samples at pA = 1, 5% more at pA = 0.9 vs p* = Phi(1). Cullen, Montague, Rubinstein (2026,
arXiv 2606.27694) report savings of the same order (~20x) with e-processes, of which these
mixture martingales are an instance.

Functions accept numpy arrays (vectorised over k, t, p) unless documented as scalar.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.special import betainc, betaincc, betaln, xlog1py, xlogy

NAME = "beta-binomial-mixture-cs"
ABOVE_PRIOR = 0.5  # b of the lower side: (1 - Q)/(1 - p) ~ Beta(b, 1)
BELOW_PRIOR = 1.0  # a of the upper side: Q/p ~ Beta(a, 1)

Array = Any  # float or numpy array


class Decision(enum.StrEnum):
    CERTIFIED = "certified"  # the CS lies entirely above p*
    NOT_CERTIFIED = "not_certified"  # the CS lies entirely below p*
    UNDECIDED = "undecided"  # the sample cap was reached first


def log_evidence_above(k: Array, t: Array, p: Array, b: float = ABOVE_PRIOR) -> Array:
    """log M+_t(p): evidence that pA > p after k hits in t samples (module docstring).

    ``p`` in [0, 1); 0 <= k <= t. Exact (to float precision) for p < k/t, where values of pA
    get excluded; capped at 0 (M+ <= 1) for p >= k/t. +inf at p = 0 with k >= 1.
    """
    if np.ndim(k) == np.ndim(t) == np.ndim(p) == 0:
        return _log_above_scalar(float(k), float(t), float(p), b)
    k, t, p = np.asarray(k, float), np.asarray(t, float), np.asarray(p, float)
    with np.errstate(divide="ignore"):
        value = (
            math.log(b)
            + betaln(k + 1, t - k + b)
            + np.log(betaincc(k + 1, t - k + b, p))
            - b * np.log1p(-p)
            - xlogy(k, p)
            - xlog1py(t - k, -p)
        )
    # For p >= k/t every l(q)/l(p) with q > p is <= 1, so M+ <= 1. There the tail I^c_p can be
    # below the smallest normal float, where scipy returns inaccurate subnormals: cap at 1.
    return np.where(p * t >= k, np.minimum(value, 0.0), value)


def log_evidence_below(k: Array, t: Array, p: Array, a: float = BELOW_PRIOR) -> Array:
    """log M-_t(p): evidence that pA < p after k hits in t samples (module docstring).

    ``p`` in (0, 1]; 0 <= k <= t. Exact for p > k/t; capped at 0 (M- <= 1) for p <= k/t.
    +inf at p = 1 with k < t.
    """
    if np.ndim(k) == np.ndim(t) == np.ndim(p) == 0:
        return _log_below_scalar(float(k), float(t), float(p), a)
    k, t, p = np.asarray(k, float), np.asarray(t, float), np.asarray(p, float)
    with np.errstate(divide="ignore"):
        value = (
            math.log(a)
            + betaln(k + a, t - k + 1)
            + np.log(betainc(k + a, t - k + 1, p))
            - a * np.log(p)
            - xlogy(k, p)
            - xlog1py(t - k, -p)
        )
    return np.where(p * t <= k, np.minimum(value, 0.0), value)  # M- <= 1 for p <= k/t


def _log_above_scalar(k: float, t: float, p: float, b: float) -> float:
    """:func:`log_evidence_above` for one (k, t, p), without numpy's array overhead."""
    if p <= 0.0:
        return math.inf if k > 0 else math.log(b / (t + b))
    tail = float(betaincc(k + 1, t - k + b, p))
    if tail <= 0.0:
        return -math.inf
    value = (
        math.log(b)
        + float(betaln(k + 1, t - k + b))
        + math.log(tail)
        - b * math.log1p(-p)
        - k * math.log(p)
        - (t - k) * math.log1p(-p)
    )
    return min(value, 0.0) if p * t >= k else value


def _log_below_scalar(k: float, t: float, p: float, a: float) -> float:
    """:func:`log_evidence_below` for one (k, t, p), without numpy's array overhead."""
    if p >= 1.0:
        return math.inf if k < t else math.log(a / (t + a))
    head = float(betainc(k + a, t - k + 1, p))
    if head <= 0.0:
        return -math.inf
    value = (
        math.log(a)
        + float(betaln(k + a, t - k + 1))
        + math.log(head)
        - a * math.log(p)
        - k * math.log(p)
        - (t - k) * math.log1p(-p)
    )
    return min(value, 0.0) if p * t <= k else value


@dataclass(frozen=True)
class ConfidenceSequence:
    """The time-uniform (1 - alpha) lower and upper confidence sequences for pA.

    ``lower``/``above`` are the lower sequence (P(exists t: L_t > pA) <= alpha), ``upper``/
    ``below`` the upper one (P(exists t: U_t < pA) <= alpha); each side holds at level alpha on
    its own. ``k`` hits of ``t`` samples; ``t = 0`` gives the trivial bounds 0 and 1.
    """

    alpha: float
    above_prior: float = ABOVE_PRIOR
    below_prior: float = BELOW_PRIOR
    name: str = NAME

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, int | float) and 0 < self.alpha < 1):
            raise ValueError(f"alpha must lie in (0, 1), got {self.alpha!r}")

    @property
    def threshold(self) -> float:
        """log(1/alpha): the evidence at which a value of pA is excluded."""
        return -math.log(self.alpha)

    def above(self, k: Array, t: Array, p: Array) -> Array:
        """Whether the sequence lies entirely above ``p`` (every value <= p excluded)."""
        if not np.all((np.asarray(p) >= 0) & (np.asarray(p) < 1)):
            raise ValueError("p must lie in [0, 1)")
        return log_evidence_above(k, t, p, self.above_prior) >= self.threshold

    def below(self, k: Array, t: Array, p: Array) -> Array:
        """Whether the sequence lies entirely below ``p`` (every value >= p excluded)."""
        if not np.all((np.asarray(p) > 0) & (np.asarray(p) <= 1)):
            raise ValueError("p must lie in (0, 1]")
        return log_evidence_below(k, t, p, self.below_prior) >= self.threshold

    def lower(self, k: int, t: int) -> float:
        """L_t (scalar): a root of M+_t(p) = 1/alpha, rounded down (every p <= L_t excluded).

        0 when k = 0 (nothing excluded).
        """
        _check_counts(k, t)
        if k == 0:
            return 0.0

        def excess(p: float) -> float:
            return float(log_evidence_above(k, t, p, self.above_prior)) - self.threshold

        # +inf at p = 0; at the MLE k/t, M+ <= 1 < 1/alpha (the mixture of l(q)/l(k/t) <= 1).
        return _safe_root(excess, 0.0, k / t, side=-1)

    def upper(self, k: int, t: int) -> float:
        """U_t (scalar): a root of M-_t(p) = 1/alpha, rounded up (every p >= U_t excluded).

        1 when k = t (nothing excluded).
        """
        _check_counts(k, t)
        if k == t:
            return 1.0

        def excess(p: float) -> float:
            return float(log_evidence_below(k, t, p, self.below_prior)) - self.threshold

        return _safe_root(excess, k / t, 1.0, side=+1)

    def min_samples_above(self, p: float, limit: int) -> int | None:
        """Fewest samples that can put the sequence above ``p`` (all hits); None if > limit."""
        return _first_true(lambda t: bool(self.above(t, t, p)), limit)

    def min_samples_below(self, p: float, limit: int) -> int | None:
        """Fewest samples that can put the sequence below ``p`` (no hits); None if > limit."""
        return _first_true(lambda t: bool(self.below(0, t, p)), limit)


def _check_counts(k: int, t: int) -> None:
    if not (0 <= k <= t and t >= 1):
        raise ValueError(f"need 0 <= k <= t and t >= 1, got k={k}, t={t}")


def _safe_root(excess: Any, lo: float, hi: float, side: int) -> float:
    """The crossing of a monotone ``excess`` in [lo, hi], moved to the side where it is >= 0.

    ``side=-1``: excess >= 0 left of the root, lo = 0 (lower bound); ``+1``: right of it,
    hi = 1 (upper bound). Brent's method to full float precision, then nudged until the excess
    really is >= 0, so float rounding can only make the bound more conservative.
    """
    edge = 0.0 if side < 0 else 1.0
    near = float(np.nextafter(edge, 0.5))  # the evidence is infinite at the edge itself
    if excess(near) < 0:  # nothing but the edge excluded
        return edge
    inner = min(hi, float(np.nextafter(1.0, 0.0))) if side < 0 else max(lo, 5e-324)
    a, b = (near, inner) if side < 0 else (inner, near)

    def finite(p: float) -> float:  # Brent's interpolation needs finite values
        return float(min(max(excess(p), -1e6), 1e6))

    root = float(brentq(finite, a, b, xtol=1e-15, rtol=4 * np.finfo(float).eps))
    step = 1e-15
    while excess(root) < 0:
        root = max(root - step, near) if side < 0 else min(root + step, near)
        step *= 4
    return root


def _first_true(pred: Any, limit: int) -> int | None:
    """Smallest t in [1, limit] with pred(t), for pred monotone in t (doubling, then bisection)."""
    hi = 1
    while not pred(hi):
        if hi >= limit:
            return None
        hi = min(2 * hi, limit)
    lo = hi // 2  # pred(lo) is false (or lo = 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if pred(mid) else (mid, hi)
    return hi


def decision(
    cs: ConfidenceSequence, k_a: int, k_top: int, t: int, p_star: float
) -> Decision | None:
    """The decision after t samples, or None to keep sampling.

    ``certified`` when the sequence for the selected class (``k_a`` hits) lies above p*;
    ``not_certified`` when the sequence for the most frequent class (``k_top`` >= k_a hits)
    lies below p*: then every class's does, and since p* > 1/2 at most one class can have
    probability >= p*, so one sequence at level alpha bounds this error whichever class was
    selected.
    """
    if t <= 0:
        return None
    if cs.above(k_a, t, p_star):
        return Decision.CERTIFIED
    if cs.below(k_top, t, p_star):
        return Decision.NOT_CERTIFIED
    return None


MIN_CHUNK = 32  # fewest samples per look: each look is one counts() round trip
GROWTH = 1.25  # each look adds 25% of the samples drawn so far


def chunk_sizes(
    n: int,
    first: int,
    growth: float = GROWTH,
    minimum: int = MIN_CHUNK,
    look_at: int | None = None,
) -> Iterator[int]:
    """Chunk sizes summing to ``n``: ``first``, then ``growth - 1`` times the samples so far.

    Geometric looks: stopping at the first look after the earliest possible stop costs at most
    a factor ``growth`` in samples, while the number of looks (engine round trips, bound
    evaluations) grows only like log(n / first) / log(growth); the confidence sequence itself
    charges nothing per look. No chunk is smaller than ``minimum`` except one that ends exactly
    at ``look_at`` (e.g. the first sample count at which a decision is possible at all).
    """
    if n < 1 or first < 1 or growth <= 1 or minimum < 1:
        raise ValueError("need n, first, minimum >= 1 and growth > 1")
    drawn = 0
    size = first
    while drawn < n:
        size = min(size, n - drawn)
        if n - drawn - size < minimum:  # no tiny last chunk: take the rest now
            size = n - drawn
        if look_at is not None and drawn < look_at < drawn + size:
            size = look_at - drawn
        yield size
        drawn += size
        size = max(minimum, math.ceil(drawn * (growth - 1)))


def decision_chunks(cs: ConfidenceSequence, n: int, p_star: float) -> Iterator[int]:
    """The chunk sizes :func:`models.smoothing.decide` draws for the decision at ``p_star``.

    No look before the first sample count at which any decision is possible (all hits
    certify, or no hits refute); a look exactly when all hits would first certify (the cost
    of an easy input); then geometric looks (:func:`chunk_sizes`).
    """
    first, can_certify = _first_looks(cs, p_star, n)
    return chunk_sizes(n, first, look_at=can_certify)


@lru_cache(maxsize=1024)
def _first_looks(cs: ConfidenceSequence, p_star: float, n: int) -> tuple[int, int | None]:
    """(first chunk, first sample count at which all hits certify): fixed per request kind."""
    can_certify = cs.min_samples_above(p_star, n)
    can_refute = cs.min_samples_below(p_star, n)
    first = min(t for t in (can_certify, can_refute, n) if t is not None)
    return max(first, MIN_CHUNK), can_certify


@lru_cache(maxsize=1024)
def all_hits_lower(cs: ConfidenceSequence, n: int) -> float:
    """L_n after n hits of n: the largest pA (and radius) n samples can certify (cached)."""
    return cs.lower(n, n)


# --- DECIDE without a selection stage (n0 = 0): docs/DESIGN.md section 5, "Merged selection" ---

FIRST_LEADER = 1  # samples drawn before the first predictable class exists (not tested)
MERGED_MIN_CHUNK = 4  # fewest samples per look once a decision is possible
# Looks of merged DECIDE after the first: +10% of the samples drawn (not GROWTH's 25%). The
# sequence holds at every t, so the schedule changes the cost, never the error; near p* the
# smaller overshoot is what makes refutations no slower than a look after every sample
# (python -m bench.boundaries --peers, docs/PERFORMANCE.md), for about 2.3x the looks on the
# inputs that run long (71 instead of 36 up to n = 10,000, 95 instead of 47 up to 100,000).
MERGED_GROWTH = 1.1
# Refutation prior of merged DECIDE: Q/p ~ Beta(8, 1), mass near p*, where refutations are
# hard (python -m bench.boundaries --peers: 15% fewer samples at pA = p* - 0.01, r = 2 sigma).
# Any prior gives a level-alpha sequence (Ville), so this changes the cost, never the error.
REFUTE_PRIOR = 8.0


@lru_cache(maxsize=64)
def merged_sequence(alpha: float) -> ConfidenceSequence:
    """The level-alpha sequence merged DECIDE tests with: the shipped lower side (certify) and
    the upper side with prior Q/p ~ Beta(REFUTE_PRIOR, 1) (refute, ``pa_upper``)."""
    return ConfidenceSequence(alpha, below_prior=REFUTE_PRIOR)


@lru_cache(maxsize=256)
def class_sequence(alpha: float, num_classes: int) -> ConfidenceSequence:
    """The level-alpha/K sequence of one class (K = ``num_classes``, the model's classes).

    Every class's sequence holds at alpha/K, so by the union bound all K hold together with
    probability >= 1 - alpha: a bound taken from the sequence of a class chosen after looking
    at the data (the returned class) is still valid at level alpha.
    """
    if num_classes < 1:
        raise ValueError(f"need at least one class, got {num_classes}")
    return ConfidenceSequence(alpha / num_classes)


def merged_decision(
    cs: ConfidenceSequence, hits: int, k_top: int, t: int, p_star: float, num_classes: int
) -> Decision | None:
    """The merged-selection decision after t samples, or None to keep sampling.

    ``hits`` = sum of h_s = 1{Y_s = c_s} over samples s = FIRST_LEADER + 1 .. t, where c_s is
    the most frequent class among samples 1..s-1 (chosen before Y_s is seen; any predictable
    choice works, DECIDE takes the leader at the start of each chunk). ``k_top`` is the count of
    the most frequent class among all t samples (the class returned).

    ``certified`` when the one-sided mixture of ``cs`` on (hits, t - FIRST_LEADER) lies above
    p* AND the returned class's level-alpha/K sequence (:func:`class_sequence`) lies above
    1 - p*; ``not_certified`` when the level-alpha sequence of the most frequent class lies
    below p* (as :func:`decision`). Each errs with probability <= alpha under any optional
    stopping (proof in docs/DESIGN.md section 5); alpha is not split between the two parts of
    the certification rule because they guard disjoint cases of the truth.
    """
    trials = t - FIRST_LEADER
    if (
        trials >= 1
        and cs.above(hits, trials, p_star)
        and class_sequence(cs.alpha, num_classes).above(k_top, t, 1.0 - p_star)
    ):
        return Decision.CERTIFIED
    if t >= 1 and cs.below(k_top, t, p_star):
        return Decision.NOT_CERTIFIED
    return None


def merged_chunks(
    cs: ConfidenceSequence,
    n: int,
    p_star: float,
    num_classes: int,
    growth: float = MERGED_GROWTH,
) -> Iterator[int]:
    """Chunk sizes (summing to ``n``) of DECIDE with merged selection.

    The leader (the class h_s tests) is updated at every chunk end, so the first chunks are
    short: FIRST_LEADER sample, then doubling until a decision first becomes possible. Looks:
    exactly when all hits would first certify and when the fewest samples could first refute
    (the most frequent of K classes holds at least ceil(t / K) of t), then +``growth - 1`` of
    the samples drawn, never fewer than MERGED_MIN_CHUNK.
    """
    if n < 1 or num_classes < 1:
        raise ValueError("need n >= 1 and at least one class")
    can_certify, can_refute = _merged_first_looks(cs, p_star, n, num_classes)
    first = min(t for t in (can_certify, can_refute, n) if t is not None)
    looks = {FIRST_LEADER, first, n}
    t = FIRST_LEADER
    while 2 * t < first:
        t *= 2
        looks.add(t)
    if can_certify is not None:
        looks.add(can_certify)
    t = first
    while t < n:
        t = max(t + MERGED_MIN_CHUNK, math.ceil(t * growth))
        looks.add(min(t, n))
    drawn = 0
    for look in sorted(v for v in looks if v <= n):
        yield look - drawn
        drawn = look


@lru_cache(maxsize=1024)
def _merged_first_looks(
    cs: ConfidenceSequence, p_star: float, n: int, num_classes: int
) -> tuple[int | None, int | None]:
    """(first t at which all hits certify, first t at which any counts can refute)."""
    per_class = class_sequence(cs.alpha, num_classes)
    can_certify = _first_true(
        lambda t: (
            t > FIRST_LEADER
            and bool(cs.above(t - FIRST_LEADER, t - FIRST_LEADER, p_star))
            and bool(per_class.above(t, t, 1.0 - p_star))
        ),
        n,
    )
    can_refute = _first_true(lambda t: bool(cs.below(-(-t // num_classes), t, p_star)), n)
    return can_certify, can_refute
