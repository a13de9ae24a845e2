"""DECIDE side by side with the peers and the limits: TOTAL samples (selection included) to the
decision "pA > p*?" (docs/PERFORMANCE.md, "Side by side with the peers and the limit").

``python -m bench.boundaries --peers [--alpha 0.001] [--n 10000] [--runs 4000]`` prints, for
p* = Phi(r / sigma) at r = sigma and 2 sigma and pA in :data:`P_A_PEERS` (the top class; the
rest of the mass on a second class, K = 10 classes), the median and mean total samples of:

* ``merged (n0=0)`` - DECIDE as shipped (:func:`models.sequential.merged_decision` on
  :func:`models.sequential.merged_chunks`), seeded runs (:func:`bench.merged.simulate`); the
  look schedule makes an exact dynamic program over (class counts, predictable hits) too big
  at n = 10,000, so this column is the one simulated;
* ``n0=100`` - DECIDE with a Cohen-style selection stage (:func:`models.sequential.decision`
  on :func:`models.sequential.decision_chunks`), exact: the law of the selected class
  (ties to the top class, as ``argmax``) times the exact law of the stopping time;
* ``Voracek KT`` - the two-sided Krichevsky-Trofimov (Beta(1/2, 1/2)) mixture martingale
  (Voracek, NeurIPS 2024, arXiv 2406.17830) at its TRUE level: certified when
  M_t(p*) >= 1/alpha with k/t > p*, not certified when M_t(p*) >= 1/alpha with k/t < p*,
  looked at after every sample. Ville's inequality bounds the chance of any crossing under
  pA = p* by alpha. (Its published thresholds use 1/(2 alpha), which is only a 2 alpha
  level.) Exact;
* ``Horvath AS`` - adaptive sampling (Horvath, Mueller, Fischer, Vechev, ICLR 2022, section
  4): s = 3 stages of fresh samples (100, 1,000, 8,900: the cap n in total), each tested by
  one-sided Clopper-Pearson bounds at alpha / s (Bonferroni over the stages): certified when
  the lower bound exceeds p*, not certified when the upper bound is below p*. Exact.

The peers are given the right class for free (no selection samples counted): with their papers'
n0 = 100 selection stage each would need 100 more. The limits: ``all hits`` = ln(alpha) /
ln(p*), the fewest samples any level-alpha test needs to certify; ``Wald`` = ln(1/alpha) /
KL(pA || p*), the expected samples of the sequential probability ratio test that knows pA
(Wald's lower bound for any level-alpha test, to first order).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from scipy.special import betaln, ndtr
from scipy.stats import beta, binom

from bench.merged import simulate
from models.sequential import ConfidenceSequence, decision_chunks

NUM_CLASSES = 10
N0 = 100
HORVATH_STAGES = (100, 1_000, 8_900)


def p_a_values(p_star: float) -> list[tuple[str, float]]:
    """The pA of the table: ~1 (1.0), 0.99, 0.95, 0.9, p* + 0.01, p* - 0.01, 0.6."""
    out = [("1", 1.0), ("0.99", 0.99), ("0.95", 0.95), ("0.9", 0.9)]
    out += [("p*+0.01", min(p_star + 0.01, 1.0)), ("p*-0.01", p_star - 0.01), ("0.6", 0.6)]
    return out


StopRule = Callable[[int], tuple[np.ndarray, np.ndarray]]  # t -> (certified, refuted) per k


def stopping_law(
    looks: list[int], stop: StopRule, p: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact law of the stopping time of a rule on k ~ Bin(t, p) looked at after ``looks``.

    ``stop(t)`` gives boolean arrays over k = 0..t. Returns (looks, P(stop at each look), of
    which P(certified)); the mass left at the last look is counted as stopping there (cap n).
    """
    dist, prev = np.array([1.0]), 0
    stop_p, cert_p = np.zeros(len(looks)), np.zeros(len(looks))
    for i, t in enumerate(looks):
        dist = np.convolve(dist, binom.pmf(np.arange(t - prev + 1), t - prev, p))
        prev = t
        certified, refuted = stop(t)
        done = certified | refuted
        stop_p[i], cert_p[i] = dist[done].sum(), dist[certified].sum()
        dist = np.where(done, 0.0, dist)
    stop_p[-1] += dist.sum()
    return np.asarray(looks), stop_p, cert_p


def median_mean(values: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """Median (smallest value with cumulative weight >= 1/2) and mean of a discrete law."""
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order] / weights.sum()
    median = float(v[np.searchsorted(np.cumsum(w), 0.5 - 1e-12)])
    return median, float((v * w).sum())


def n0_rule(cs: ConfidenceSequence, p_star: float, selected_top: bool) -> StopRule:
    """Today's DECIDE after selection: k = hits of the top class among t estimation samples;
    the selected class has k (or t - k) hits, the most frequent one max(k, t - k)."""

    def stop(t: int) -> tuple[np.ndarray, np.ndarray]:
        k = np.arange(t + 1)
        k_a = k if selected_top else t - k
        certified = cs.above(k_a, t, p_star)
        refuted = ~certified & cs.below(np.maximum(k, t - k), t, p_star)
        return certified, refuted

    return stop


def n0_law(alpha: float, p_star: float, n: int, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Total samples (N0 + estimation) of DECIDE with n0 = N0, exact: (values, probabilities)."""
    cs = ConfidenceSequence(alpha)
    looks = [int(t) for t in np.cumsum(list(decision_chunks(cs, n, p_star)))]
    k = np.arange(N0 + 1)
    w_top = float(binom.pmf(k, N0, p)[2 * k >= N0].sum())  # ties go to the top class
    values, probs = [], []
    for selected_top, w in ((True, w_top), (False, 1.0 - w_top)):
        if w <= 0:
            continue
        t, s, _ = stopping_law(looks, n0_rule(cs, p_star, selected_top), p)
        values.append(t + N0)
        probs.append(w * s)
    return np.concatenate(values), np.concatenate(probs)


def kt_log_martingale(k: np.ndarray, t: int, p_star: float) -> np.ndarray:
    """log M_t(p*) of the two-sided KT (Beta(1/2, 1/2)) mixture after k hits of t."""
    return (
        betaln(k + 0.5, t - k + 0.5)
        - betaln(0.5, 0.5)
        - k * math.log(p_star)
        - (t - k) * math.log1p(-p_star)
    )


@lru_cache(maxsize=8)
def voracek_thresholds(alpha: float, p_star: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per t = 1..n (index t): fewest hits that certify, most hits that refute (-1: none)."""
    threshold = -math.log(alpha)
    up, down = np.full(n + 1, n + 2), np.full(n + 1, -1)
    for t in range(1, n + 1):
        k = np.arange(t + 1)
        crossed = kt_log_martingale(k, t, p_star) >= threshold
        cert, refute = crossed & (k > p_star * t), crossed & (k < p_star * t)
        if cert.any():
            up[t] = int(np.argmax(cert))
        if refute.any():
            down[t] = int(np.nonzero(refute)[0].max())
    return up, down


def voracek_law(alpha: float, p_star: float, n: int, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Voracek's KT sequence at level alpha (threshold ln(1/alpha)), a look after every sample:
    exact law of its stopping time (class given)."""
    up, down = voracek_thresholds(alpha, p_star, n)

    def stop(t: int) -> tuple[np.ndarray, np.ndarray]:
        k = np.arange(t + 1)
        return k >= up[t], k <= down[t]

    t, s, _ = stopping_law(list(range(1, n + 1)), stop, p)
    return t, s


def horvath_law(alpha: float, p_star: float, p: float) -> tuple[np.ndarray, np.ndarray]:
    """Horvath et al.'s adaptive sampling (fresh samples per stage, Clopper-Pearson at
    alpha / s): exact law of its total samples (class given)."""
    a = alpha / len(HORVATH_STAGES)
    values, probs, go_on, drawn = [], [], 1.0, 0
    for i, m in enumerate(HORVATH_STAGES):
        drawn += m
        k = np.arange(m + 1)
        lower = np.where(k > 0, beta.ppf(a, np.maximum(k, 1), m - k + 1), 0.0)
        upper = np.where(k < m, beta.ppf(1 - a, k + 1, np.maximum(m - k, 1)), 1.0)
        done = (lower > p_star) | (upper < p_star)
        last = i == len(HORVATH_STAGES) - 1
        stop_here = 1.0 if last else float(binom.pmf(k, m, p)[done].sum())
        values.append(drawn)
        probs.append(go_on * stop_here)
        go_on *= 1.0 - stop_here
    return np.asarray(values), np.asarray(probs)


def merged_totals(
    alpha: float, p_star: float, n: int, p: float, runs: int, seed: int
) -> np.ndarray:
    """Total samples of merged DECIDE (n0 = 0) on ``runs`` seeded runs."""
    probs = np.zeros(NUM_CLASSES)
    probs[0], probs[1] = p, 1.0 - p
    _, used = simulate(probs, p_star, alpha, n, runs, seed)
    return used


def kl(p: float, q: float) -> float:
    """KL(Bernoulli(p) || Bernoulli(q)) in nats."""
    out = 0.0
    if p > 0:
        out += p * math.log(p / q)
    if p < 1:
        out += (1 - p) * math.log((1 - p) / (1 - q))
    return out


COLUMNS = ("merged (n0=0)", "n0=100", "Voracek KT", "Horvath AS")


def rows(alpha: float, n: int, runs: int, seed: int) -> list[dict[str, object]]:
    """One row per (r / sigma, pA): median and mean total samples of each procedure."""
    out: list[dict[str, object]] = []
    for z in (1.0, 2.0):
        p_star = float(ndtr(z))
        for label, p in p_a_values(p_star):
            used = merged_totals(alpha, p_star, n, p, runs, seed)
            laws = {
                "n0=100": n0_law(alpha, p_star, n, p),
                "Voracek KT": voracek_law(alpha, p_star, n, p),
                "Horvath AS": horvath_law(alpha, p_star, p),
            }
            row: dict[str, object] = {
                "r": z,
                "p_star": p_star,
                "label": label,
                "pA": p,
                "merged (n0=0)": (float(np.median(used)), float(used.mean())),
            }
            for name, (values, probs) in laws.items():
                row[name] = median_mean(values.astype(float), probs)
            row["all hits"] = math.log(alpha) / math.log(p_star)
            row["Wald"] = math.log(1 / alpha) / kl(p, p_star) if p != p_star else math.inf
            out.append(row)
    return out


def table(alpha: float, n: int, runs: int, seed: int) -> str:
    lines = [
        f"alpha = {alpha:g}, cap n = {n:,}, K = {NUM_CLASSES} classes; TOTAL samples "
        f"(selection included), median / mean; merged: {runs:,} seeded runs (seed {seed}), "
        "the others exact. Peers are given the class (add 100 for their n0 = 100 selection).",
        "",
        "| r | pA | " + " | ".join(COLUMNS) + " | all hits | Wald |",
        "|---|---|" + "---:|" * (len(COLUMNS) + 2),
    ]
    for row in rows(alpha, n, runs, seed):
        cells = []
        for name in COLUMNS:
            pair = row[name]
            assert isinstance(pair, tuple)
            med, mean = float(pair[0]), float(pair[1])
            cells.append(f"{med:,.0f} / {mean:,.1f}")
        r = "sigma" if row["r"] == 1.0 else "2 sigma"
        p_a = f"{row['label']} ({row['pA']:.4g})" if "p*" in str(row["label"]) else row["label"]
        hits, wald = float(str(row["all hits"])), float(str(row["Wald"]))
        limit = f"{hits:.1f}" if row["pA"] > row["p_star"] else "-"  # type: ignore[operator]
        lines.append(f"| {r} | {p_a} | " + " | ".join(cells) + f" | {limit} | {wald:,.1f} |")
    return "\n".join(lines)
