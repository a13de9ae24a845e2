"""Why DECIDE uses the boundary it does: expected samples to a decision, computed exactly.

``python -m bench.boundaries [--alpha 0.001] [--n 10000]`` prints, for p* = Phi(1) and
Phi(2) (target radius = 1 or 2 sigma) and a range of true pA, the expected number of estimation
samples until the decision (capped at n), by dynamic programming over the binomial counts (no
simulation). Candidates, each checked at the same looks:

* ``one-sided mixtures`` - :class:`models.sequential.ConfidenceSequence` as shipped
  (lower side prior (1 - Q)/(1 - p) ~ Beta(1/2, 1), upper side Q/p ~ Beta(1, 1));
* ``one-sided, uniform`` - the same with a uniform prior on the lower side (b = 1);
* ``two-sided Jeffreys`` - the two-sided beta-binomial mixture with a Beta(1/2, 1/2) prior (the
  Krichevsky-Trofimov plug-in bettor), M_t(p) >= 1/alpha on the side of the estimate;
* ``CP + Bonferroni`` - Clopper-Pearson at alpha_j = alpha * 6 / (pi^2 j^2) at the j-th look
  (valid only at these pre-set looks).

Looks: "dense" (every 2% of the samples so far, a stand-in for looking after every sample) and
DECIDE's schedule (:func:`models.sequential.decision_chunks`: first look when the boundary can
first decide, a look when all hits would first certify, then +25% per look), built for each
boundary from its own earliest decisions.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

import numpy as np
from scipy.special import betaln, ndtr
from scipy.stats import beta, binom

from models.sequential import MIN_CHUNK, ConfidenceSequence, chunk_sizes, decision_chunks

P_A = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
Rule = Callable[[int, int, int], tuple[bool, bool]]  # (k, t, look index) -> (above, below)


def one_sided(cs: ConfidenceSequence, p_star: float) -> Rule:
    return lambda k, t, j: (bool(cs.above(k, t, p_star)), bool(cs.below(k, t, p_star)))


def two_sided_jeffreys(alpha: float, p_star: float) -> Rule:
    def rule(k: int, t: int, j: int) -> tuple[bool, bool]:
        log_m = (
            betaln(k + 0.5, t - k + 0.5)
            - betaln(0.5, 0.5)
            - k * math.log(p_star)
            - (t - k) * math.log1p(-p_star)
        )
        excluded = log_m >= -math.log(alpha)
        return excluded and k > p_star * t, excluded and k < p_star * t

    return rule


def bonferroni_cp(alpha: float, p_star: float) -> Rule:
    def rule(k: int, t: int, j: int) -> tuple[bool, bool]:
        a = alpha * 6 / (math.pi**2 * j**2)
        lower = float(beta.ppf(a, k, t - k + 1)) if k > 0 else 0.0
        upper = float(beta.ppf(1 - a, k + 1, t - k)) if k < t else 1.0
        return lower > p_star, upper < p_star

    return rule


def first_true(pred: Callable[[int], bool], limit: int) -> int | None:
    t = 1
    while not pred(t):
        if t >= limit:
            return None
        t = min(2 * t, limit)
    lo = t // 2
    while t - lo > 1:
        mid = (lo + t) // 2
        lo, t = (lo, mid) if pred(mid) else (mid, t)
    return t


def decide_looks(rule: Rule, n: int) -> list[int]:
    """DECIDE's schedule for this rule: first look when it can first decide, then +25%."""
    can_certify = first_true(lambda t: rule(t, t, 1)[0], n)
    can_refute = first_true(lambda t: rule(0, t, 1)[1], n)
    first = min(t for t in (can_certify, can_refute, n) if t is not None)
    sizes = chunk_sizes(n, max(first, MIN_CHUNK), look_at=can_certify)
    return [int(t) for t in np.cumsum(list(sizes))]


def thresholds(rule: Rule, looks: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per look: smallest k deciding 'above' (t + 1: none), largest deciding 'below' (-1)."""
    ups, downs = [], []
    for j, t in enumerate(looks, 1):
        lo, hi = -1, t + 1  # binary search: 'above' is monotone in k
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if rule(mid, t, j)[0] else (mid, hi)
        ups.append(hi)
        lo, hi = -1, t + 1  # 'below' holds for k <= some k
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if rule(mid, t, j)[1] else (lo, mid)
        downs.append(lo)
    return np.array(ups), np.array(downs)


def expected_samples(looks: list[int], up: np.ndarray, down: np.ndarray, p: float) -> float:
    dist, prev, expected = np.array([1.0]), 0, 0.0
    for t, u, d in zip(looks, up, down, strict=True):
        dist = np.convolve(dist, binom.pmf(np.arange(t - prev + 1), t - prev, p))
        prev = t
        ks = np.arange(dist.size)
        stop = (ks >= u) | (ks <= d)
        expected += t * dist[stop].sum()
        dist = np.where(stop, 0.0, dist)
    return expected + looks[-1] * dist.sum()


def table(alpha: float, n: int) -> str:
    cs = ConfidenceSequence(alpha)
    lines = []
    for z in (1.0, 2.0):
        p_star = float(ndtr(z))
        dense = [int(t) for t in np.cumsum(list(chunk_sizes(n, 1, growth=1.02, minimum=1)))]
        rules = {
            "one-sided mixtures (shipped)": one_sided(cs, p_star),
            "one-sided, uniform prior": one_sided(
                ConfidenceSequence(alpha, above_prior=1.0), p_star
            ),
            "two-sided Jeffreys (KT)": two_sided_jeffreys(alpha, p_star),
            "CP + Bonferroni over looks": bonferroni_cp(alpha, p_star),
        }
        lines += [
            "",
            f"p* = Phi({z:g}) = {p_star:.4f} (target radius {z:g} sigma), alpha = {alpha:g}, "
            f"n = {n:,}: expected estimation samples to a decision",
            "",
            "| boundary | looks | " + " | ".join(f"pA={p:g}" for p in P_A) + " |",
            "|---|---|" + "---:|" * len(P_A),
        ]
        for label in ("dense", "DECIDE's"):
            for name, rule in rules.items():
                looks = dense if label == "dense" else decide_looks(rule, n)
                if label != "dense" and name.endswith("(shipped)"):  # DECIDE's own code agrees
                    assert looks == [
                        int(t) for t in np.cumsum(list(decision_chunks(cs, n, p_star)))
                    ]
                up, down = thresholds(rule, looks)
                row = [expected_samples(looks, up, down, p) for p in P_A]
                lines.append(
                    f"| {name} | {label} ({len(looks)}) | "
                    + " | ".join(f"{v:,.0f}" for v in row)
                    + " |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument(
        "--peers",
        action="store_true",
        help="total samples of merged DECIDE, n0=100, Voracek's and Horvath's procedures and "
        "the limits (bench/peers.py) instead of the boundary table",
    )
    parser.add_argument("--runs", type=int, default=4000, help="--peers: seeded runs (merged)")
    parser.add_argument("--seed", type=int, default=0, help="--peers: seed of the runs")
    args = parser.parse_args(argv)
    if args.peers:
        from bench.peers import table as peers_table

        print(peers_table(args.alpha, args.n, args.runs, args.seed))
        return 0
    print(table(args.alpha, args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
