"""Randomized smoothing: PREDICT and CERTIFY (Cohen, Rosenfeld, Kolter 2019), and DECIDE;
docs/DESIGN.md sections 2 and 5.

The one certification core: the CLI, the in-process runner and the Celery worker all call
:func:`certify` / :func:`predict` / :func:`decide`, differing only in the :class:`Sampler` that
turns noisy copies into class counts. :func:`decide` answers "is x certified at radius r?"
sequentially with the anytime-valid confidence sequence of :mod:`models.sequential`.

Noise is defined per job as a stream: fixed blocks of :data:`NOISE_BLOCK` float32 samples drawn
in order from one ``torch.Generator`` seeded with the job's seed. A sampler may batch those
samples however it likes (and pack them with other jobs'), the noise each sample gets is the
same, so the counts depend only on the seed, the device and the model.
"""

from __future__ import annotations

import enum
import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from scipy.special import ndtr, ndtri
from scipy.stats import beta, binomtest, norm
from torch import Tensor, nn

from models.sequential import (
    FIRST_LEADER,
    GROWTH,
    MIN_CHUNK,
    ConfidenceSequence,
    Decision,
    all_hits_lower,
    class_sequence,
    decision,
    decision_chunks,
    merged_chunks,
    merged_decision,
    merged_sequence,
)
from models.sequential import NAME as SEQUENCE_NAME

NOISE_BLOCK = 128
SPACE = (
    "[0,1] RGB pixels after the service's resize/crop to the model's input (input_shape), before "
    "mean/std normalisation; radii of models with different input sizes are not comparable"
)

ProgressFn = Callable[[int], None]


class NoiseStream:
    """Gaussian noise N(0, 1) of one job, generated in fixed blocks so batching cannot change it."""

    def __init__(self, seed: int, shape: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.shape = tuple(shape)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._buffer: Tensor | None = None
        self._offset = 0

    def take(self, k: int) -> Tensor:
        """The next ``k`` noise samples, shape (k, *shape), float32 on the stream's device."""
        parts: list[Tensor] = []
        while k > 0:
            if self._buffer is None or self._offset == self._buffer.shape[0]:
                self._buffer = torch.randn(
                    (NOISE_BLOCK, *self.shape),
                    generator=self.generator,
                    device=self.device,
                    dtype=torch.float32,
                )
                self._offset = 0
            m = min(k, self._buffer.shape[0] - self._offset)
            parts.append(self._buffer[self._offset : self._offset + m])
            self._offset += m
            k -= m
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class Sampler(Protocol):
    """Turns ``num`` noisy copies of ``x`` into class counts (int64, host)."""

    num_classes: int
    device: torch.device

    def counts(
        self,
        x: Tensor,
        sigma: float,
        num: int,
        noise: NoiseStream,
        progress: ProgressFn | None = None,
    ) -> Tensor: ...


class BatchSampler:
    """The plain sampling loop: one job, fixed batch size, counts accumulated on the device."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        batch_size: int = 1000,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
    ):
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        self.model = model
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype

    @torch.inference_mode()
    def counts(
        self,
        x: Tensor,
        sigma: float,
        num: int,
        noise: NoiseStream,
        progress: ProgressFn | None = None,
    ) -> Tensor:
        x = x.to(self.device, torch.float32)
        total = torch.zeros(self.num_classes, dtype=torch.long, device=self.device)
        done = 0
        while done < num:
            b = min(self.batch_size, num - done)
            batch = x.unsqueeze(0) + sigma * noise.take(b)
            with torch.autocast(
                self.device.type,
                dtype=self.autocast_dtype or torch.bfloat16,
                enabled=self.autocast_dtype is not None,
            ):
                logits = self.model(batch)
            total += torch.bincount(logits.argmax(dim=1), minlength=self.num_classes)
            done += b
            if progress is not None:
                progress(b)
        return total.cpu()


class AbstainReason(enum.StrEnum):
    PA_BELOW_HALF = "pa_lower_below_half"  # CERTIFY: lower bound on pA is under 1/2
    PA_NOT_ABOVE_PB = "pa_lower_not_above_pb_upper"  # top-2 CERTIFY: bounds overlap
    NOT_SIGNIFICANT = "top_two_not_significant"  # PREDICT: binomial test did not reject


class Mode(enum.StrEnum):
    CERTIFY = "certify"
    CERTIFY_TOP2 = "certify_top2"
    PREDICT = "predict"
    DECIDE = "decide"


SEQUENCE: str = SEQUENCE_NAME  # Certificate.bound of the anytime-valid bound
CLOPPER_PEARSON = "clopper-pearson"  # Certificate.bound of the fixed-n bound


@dataclass
class Certificate:
    """Result of one PREDICT, CERTIFY or DECIDE run. ``radius`` is an L2 radius in ``space``.

    ``n`` is the number of estimation samples asked for (the cap in decide mode), ``n_used``
    the number drawn; ``bound`` names the bound behind ``pa_lower`` (and ``pa_upper``):
    ``"clopper-pearson"`` (fixed n) or :data:`models.sequential.NAME` (anytime-valid).
    Decide mode adds ``decision`` (certified / not_certified / undecided), ``target_radius``
    and ``pa_upper``; with merged selection (n0 = 0) also ``predictable_hits``, the hits of the
    predictable class over samples 2..n_used (:func:`models.sequential.merged_decision`).
    ``samples_total`` counts every forward pass the run drew, selection included (n0 + n_used).
    """

    mode: str
    prediction: int | None
    abstained: bool
    abstain_reason: str | None
    radius: float
    pa_lower: float | None
    pb_upper: float | None
    count_a: int
    count_b: int | None
    counts: list[int]
    n0: int
    n: int
    alpha: float
    sigma: float
    max_radius: float
    seed: int
    input_shape: list[int]
    pvalue: float | None = None
    space: str = SPACE
    timings: dict[str, float] = field(default_factory=dict)
    bound: str | None = None
    n_used: int | None = None
    decision: str | None = None
    target_radius: float | None = None
    pa_upper: float | None = None
    samples_total: int | None = None
    predictable_hits: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion."""
    if k <= 0:
        return 0.0
    return float(beta.ppf(alpha, k, n - k + 1))


def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion."""
    if k >= n:
        return 1.0
    return float(beta.ppf(1 - alpha, k + 1, n - k))


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """Largest radius n samples at level alpha can certify: all n hits give pA = alpha^(1/n).

    sigma * Phi^-1(alpha^(1/n)) (Cohen et al. 2019, section 3.2), never negative: 0 when n is
    below :func:`min_n`. For the top-2 bound pass alpha/2 (pB_upper is capped by 1 - pA_lower,
    so its best case is sigma * Phi^-1((alpha/2)^(1/n))).
    """
    return max(0.0, sigma * float(norm.ppf(alpha ** (1.0 / n))))


def _possible(mode: str, n: int, alpha: float) -> bool:
    """Whether n samples, all hits, let ``mode`` answer at level alpha."""
    if mode == Mode.CERTIFY:
        return bool(alpha ** (1.0 / n) > 0.5)  # pA_lower of n/n hits must pass 1/2
    if mode == Mode.CERTIFY_TOP2:
        return bool((alpha / 2) ** (1.0 / n) > 0.5)  # pA is bounded at alpha/2
    if mode == Mode.PREDICT:
        return float(binomtest(n, n, 0.5).pvalue) <= alpha  # = 2 * 0.5^n
    raise ValueError(f"unknown mode {mode!r}")


def min_n(mode: str, alpha: float) -> int:
    """Smallest n with which ``mode`` can return anything but an abstention at level alpha.

    CERTIFY: alpha^(1/n) > 1/2, i.e. n > log2(1/alpha) (10 at alpha = 0.001). certify_top2:
    (alpha/2)^(1/n) > 1/2, n > log2(2/alpha) (11). PREDICT: the two-sided binomial test of n
    hits out of n, p = 2^(1-n), must reach alpha: n >= 1 + log2(1/alpha) (11).
    """
    n = max(1, math.floor(-math.log2(alpha)) - 1)
    while not _possible(mode, n, alpha):
        n += 1
    return n


def check_n(mode: str, n: int, alpha: float) -> None:
    """ValueError giving the minimum when n samples can never certify (or predict) at alpha."""
    need = min_n(mode, alpha)
    if n < need:
        what = {
            Mode.CERTIFY: "CERTIFY can only certify when alpha^(1/n) > 1/2",
            Mode.CERTIFY_TOP2: "certify_top2 can only certify when (alpha/2)^(1/n) > 1/2",
            Mode.PREDICT: "PREDICT can only answer when 2 * 0.5^n <= alpha",
        }[Mode(mode)]
        raise ValueError(
            f"n={n} is too small for alpha={alpha:g}: {what}, which needs n >= {need} "
            "(with fewer samples every answer would be an abstention)"
        )


def _is_count(value: object) -> bool:
    """A positive whole number of samples: an integer (not a float, NaN, inf or bool) >= 1."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 1


# Smaller alphas reach floating-point underflow (1/alpha overflows below ~5.6e-309) and ask
# for no certificate anyone uses; 1e-100 already needs n > 332 to certify at all.
MIN_ALPHA = 1e-100


def validate_alpha(alpha: float, name: str = "alpha") -> None:
    """ValueError unless alpha is a finite number in [MIN_ALPHA, 0.5)."""
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and MIN_ALPHA <= alpha < 0.5):
        raise ValueError(f"{name} must lie in [{MIN_ALPHA:g}, 0.5), got {alpha!r}")


def validate(
    sigma: float, alpha: float, n: int, n0: int | None = None, *, n0_zero_ok: bool = False
) -> None:
    """Raise ValueError with a clear message on parameters no certificate can use.

    ``n0_zero_ok``: n0 = 0 is allowed (DECIDE with merged selection)."""
    if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
    validate_alpha(alpha)
    if not _is_count(n):
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if n0 is not None and not (_is_count(n0) or (n0_zero_ok and _is_zero(n0))):
        least = "a non-negative" if n0_zero_ok else "a positive"
        raise ValueError(f"n0 must be {least} integer, got {n0!r}")


def _is_zero(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) == 0


def _top_two(counts: Sequence[int]) -> tuple[int, int]:
    """The most and second most frequent classes; ties go to the lower index."""
    order = sorted(range(len(counts)), key=lambda i: -int(counts[i]))  # a stable sort
    return order[0], order[1] if len(order) > 1 else order[0]


BoundFn = Callable[[int, float], float]


@dataclass(frozen=True)
class Outcome:
    """What a run's counts imply: the statistics of a :class:`Certificate`."""

    prediction: int | None
    abstain_reason: str | None
    radius: float
    pa_lower: float | None
    pb_upper: float | None
    count_a: int
    count_b: int | None
    pvalue: float | None = None


def certify_outcome(
    counts: Sequence[int],
    c_a: int,
    n: int,
    sigma: float,
    alpha: float,
    *,
    top2: bool = False,
    lower: BoundFn | None = None,
    upper: BoundFn | None = None,
) -> Outcome:
    """CERTIFY's answer from the n estimation ``counts`` (one per class) and the class ``c_a``
    the n0 selection samples chose (Cohen et al. 2019, section 3.2; docs/DESIGN.md section 2).

    pA_lower = ``lower(k_a, alpha)`` (default: the one-sided Clopper-Pearson bound at n); below
    1/2 an abstention, else radius = sigma * Phi^-1(pA_lower). With ``top2``: pA_lower at
    alpha/2 and every other class's ``upper(k, alpha / (2 (K-1)))`` (Bonferroni), pB_upper the
    largest of those capped by 1 - pA_lower, radius = sigma/2 (Phi^-1(pA_lower) -
    Phi^-1(pB_upper)), an abstention unless pA_lower > pB_upper. The radius is in sigma's units
    (L2 in the certified space); it is 0 for an abstention.
    """
    if lower is None:
        lower = lambda k, level: clopper_pearson_lower(k, n, level)  # noqa: E731
    if upper is None:
        upper = lambda k, level: clopper_pearson_upper(k, n, level)  # noqa: E731
    k_a = int(counts[c_a])
    pb: float | None = None
    count_b: int | None = None
    if not top2:
        pa = lower(k_a, alpha)
        reason = AbstainReason.PA_BELOW_HALF if pa < 0.5 else None
        radius = sigma * float(norm.ppf(pa)) if reason is None else 0.0
    else:
        pa = lower(k_a, alpha / 2)
        others = [i for i in range(len(counts)) if i != c_a]
        per_class = alpha / (2 * max(len(others), 1))
        c_b = max(others, key=lambda i: int(counts[i])) if others else c_a
        count_b = int(counts[c_b])
        pb = min(max((upper(int(counts[i]), per_class) for i in others), default=0.0), 1.0 - pa)
        radius = 0.5 * sigma * (float(norm.ppf(pa)) - float(norm.ppf(pb))) if pa > 0 else 0.0
        reason = AbstainReason.PA_NOT_ABOVE_PB if pa <= pb or radius <= 0 else None
        radius = radius if reason is None else 0.0
    return Outcome(
        c_a if reason is None else None,
        None if reason is None else reason.value,
        radius,
        pa,
        pb,
        k_a,
        count_b,
    )


def predict_outcome(counts: Sequence[int], alpha: float) -> Outcome:
    """PREDICT's answer from its n ``counts``: the top class c1 unless the two-sided binomial
    test of its count against the runner-up's, SciPy's ``binomtest(c1, c1 + c2, 0.5)``, has a
    p-value above alpha (Cohen et al. 2019, Algorithm 1). Ties go to the lower class index."""
    c1, c2 = _top_two(counts)
    k1, k2 = int(counts[c1]), int(counts[c2]) if c2 != c1 else 0
    pvalue = float(binomtest(k1, k1 + k2, 0.5).pvalue) if k1 + k2 > 0 else 1.0
    abstain = pvalue > alpha
    reason = AbstainReason.NOT_SIGNIFICANT.value if abstain else None
    return Outcome(None if abstain else c1, reason, 0.0, None, None, k1, k2, pvalue)


def bounds(name: str, t: int) -> tuple[BoundFn, BoundFn]:
    """(lower, upper) one-sided bounds at t samples, each ``f(k, level)``: ``"clopper-pearson"``
    (valid at a fixed t, Clopper and Pearson 1934) or the anytime-valid confidence sequence of
    :mod:`models.sequential` (valid at any stopping time). ValueError for another name."""
    if name == CLOPPER_PEARSON:
        return (
            lambda k, level: clopper_pearson_lower(k, t, level),
            lambda k, level: clopper_pearson_upper(k, t, level),
        )
    if name == SEQUENCE:
        return (
            lambda k, level: ConfidenceSequence(level).lower(k, t),
            lambda k, level: ConfidenceSequence(level).upper(k, t),
        )
    raise ValueError(f"unknown bound {name!r}: known are {CLOPPER_PEARSON} and {SEQUENCE}")


def validate_budget(time_budget_s: float | None) -> None:
    """Raise ValueError unless ``time_budget_s`` is None or a positive finite number of seconds."""
    if time_budget_s is None:
        return
    ok = isinstance(time_budget_s, numbers.Real) and not isinstance(time_budget_s, bool)
    if not (ok and math.isfinite(time_budget_s) and time_budget_s > 0):
        raise ValueError(f"time budget must be a positive number of seconds, got {time_budget_s!r}")


def certify(
    sampler: Sampler,
    x: Tensor,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    seed: int,
    *,
    top2: bool = False,
    time_budget_s: float | None = None,
    stop_after: int | None = None,
    progress: ProgressFn | None = None,
) -> Certificate:
    """CERTIFY(x, n0, n, alpha): select cA on n0 samples, estimate pA on n *fresh* samples.

    With ``top2`` the radius is sigma/2 (Phi^-1(pA_lower) - Phi^-1(pB_upper)) with simultaneous
    bounds (Bonferroni): pA at alpha/2 and every other class's upper bound at
    alpha / (2 (K-1)), pB_upper being the largest of them (capped by 1 - pA_lower); the
    statistics are :func:`certify_outcome`'s.

    ``time_budget_s`` (seconds, from the call, selection included): the n0 selection samples
    and at least one chunk are always drawn; estimation then proceeds in chunks and stops at n
    or at the first chunk boundary past the budget. A run that reaches n uses Clopper-Pearson
    as without a budget (whether it gets there depends on the clock, never on the counts); one
    that stops early takes its bounds from the anytime-valid confidence sequence of
    :mod:`models.sequential` at the ``n_used`` samples drawn (valid at any stopping time), and
    ``bound`` says which was used. ``stop_after`` re-runs such a stop exactly (a replay): the
    estimation draws that many samples, and below n the bounds are the sequence's. Raises
    ValueError on bad parameters.
    """
    _check_certify(sigma, n0, n, alpha, top2, time_budget_s, stop_after)
    started = time.perf_counter()
    noise = NoiseStream(seed, x.shape, sampler.device)
    selection = sampler.counts(x, sigma, n0, noise, progress)
    c_a = int(torch.argmax(selection))
    selected = time.perf_counter()
    if time_budget_s is None:
        used = n if stop_after is None else stop_after
        drawn = sampler.counts(x, sigma, used, noise, progress)
    else:
        drawn, used = _sample_until(sampler, x, sigma, n, noise, started + time_budget_s, progress)
    counts = [int(c) for c in drawn]
    estimated = time.perf_counter()
    early = used < n  # stopped by the budget: only the anytime-valid bound holds
    lower, upper = bounds(SEQUENCE if early else CLOPPER_PEARSON, used)
    timings = {
        "selection_s": selected - started,
        "estimation_s": estimated - selected,
        "samples_per_s": (n0 + used) / max(estimated - started, 1e-9),
    }
    out = certify_outcome(counts, c_a, used, sigma, alpha, top2=top2, lower=lower, upper=upper)
    mode = Mode.CERTIFY_TOP2 if top2 else Mode.CERTIFY
    level = alpha / 2 if top2 else alpha  # top-2 spends half of alpha on pA
    cap = max(0.0, sigma * float(norm.ppf(lower(used, level)))) if early else None
    return Certificate(
        mode.value,
        out.prediction,
        out.abstain_reason is not None,
        out.abstain_reason,
        out.radius,
        out.pa_lower,
        out.pb_upper,
        count_a=out.count_a,
        count_b=out.count_b,
        counts=counts,
        n0=n0,
        n=n,
        alpha=alpha,
        sigma=sigma,
        max_radius=cap if cap is not None else max_radius(sigma, n, level),
        seed=seed,
        input_shape=list(x.shape),
        timings=timings,
        bound=SEQUENCE if early else CLOPPER_PEARSON,
        n_used=used,
        samples_total=n0 + used,
    )


def _check_certify(
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    top2: bool,
    time_budget_s: float | None,
    stop_after: int | None,
) -> None:
    """:func:`certify`'s parameter checks (ValueError with a sentence)."""
    validate(sigma, alpha, n, n0)
    check_n(Mode.CERTIFY_TOP2 if top2 else Mode.CERTIFY, n, alpha)
    validate_budget(time_budget_s)
    if stop_after is not None and (time_budget_s is not None or not 1 <= stop_after <= n):
        raise ValueError(f"stop_after must lie in [1, n] without a time budget, got {stop_after!r}")


def _sample_until(
    sampler: Sampler,
    x: Tensor,
    sigma: float,
    n: int,
    noise: NoiseStream,
    deadline: float,
    progress: ProgressFn | None,
) -> tuple[Tensor, int]:
    """Counts of up to n samples drawn in chunks until n or the first chunk end past ``deadline``.

    Chunks grow geometrically (:func:`models.sequential.chunk_sizes`' rule) but never beyond
    what the rate measured so far fits in the time left, so the budget is overrun by about one
    chunk of at least MIN_CHUNK samples at most. Reads the clock, never the counts.
    """
    began = time.perf_counter()
    total = sampler.counts(x, sigma, min(n, MIN_CHUNK), noise, progress)
    used = min(n, MIN_CHUNK)
    while used < n:
        now = time.perf_counter()
        if now >= deadline:
            break
        fits = int(min((deadline - now) * used / max(now - began, 1e-9), n))  # huge budgets
        size = max(MIN_CHUNK, min(math.ceil(used * (GROWTH - 1)), fits))
        if n - used - size < MIN_CHUNK:  # no tiny last chunk
            size = n - used
        total = total + sampler.counts(x, sigma, size, noise, progress)
        used += size
    return total, used


def validate_target(target_radius: float, sigma: float) -> float:
    """p* = Phi(target_radius / sigma); ValueError unless the target is positive and reachable."""
    ok = isinstance(target_radius, numbers.Real) and not isinstance(target_radius, bool)
    if not (ok and math.isfinite(target_radius) and target_radius > 0):
        raise ValueError(f"target radius must be a positive finite number, got {target_radius!r}")
    p_star = float(ndtr(target_radius / sigma))  # Phi
    if p_star >= 1.0:
        raise ValueError(
            f"target radius {target_radius:g} is {target_radius / sigma:.3g} sigma: "
            "Phi(target/sigma) rounds to 1, no number of samples can certify it"
        )
    return p_star


@dataclass(frozen=True)
class DecideOutcome(Outcome):
    """:class:`Outcome` of DECIDE plus its ``decision`` and the most frequent class's upper
    bound ``pa_upper``."""

    decision: str = Decision.UNDECIDED.value
    pa_upper: float | None = None


def decide_outcome(
    counts: Sequence[int],
    c_a: int,
    used: int,
    n: int,
    sigma: float,
    alpha: float,
    target_radius: float,
) -> DecideOutcome:
    """DECIDE's answer from the ``used`` estimation ``counts`` at a stop (docs/DESIGN.md
    section 5): the decision of :func:`models.sequential.decision` at ``used`` samples
    (``undecided`` when none and ``used`` reached the cap n), pA_lower from the confidence
    sequence of the selected class ``c_a`` (raised to p* when certified: every value <= p* is
    excluded), pA_upper of the most frequent class (lowered to p* when not certified), and the
    radius sigma * Phi^-1(pA_lower), at least the target when certified; an abstention when
    pA_lower < 1/2. ValueError when the counts cannot be a stop (no decision before n)."""
    cs = ConfidenceSequence(alpha)
    p_star = validate_target(target_radius, sigma)
    k_a, k_top = int(counts[c_a]), max(int(k) for k in counts)
    verdict = _stopped(decision(cs, k_a, k_top, used, p_star), used, n)
    return _decided(
        verdict, c_a, k_a, cs.lower(k_a, used), cs.upper(k_top, used), p_star, sigma,
        target_radius,
    )  # fmt: skip


def _stopped(verdict: Decision | None, used: int, n: int) -> Decision:
    """The decision at a stop: ``undecided`` at the cap n; ValueError for a stop before it
    with no decision (counts that cannot come from DECIDE)."""
    if verdict is not None:
        return verdict
    if used != n:
        raise ValueError(f"no decision at {used} samples, yet sampling stopped before n={n}")
    return Decision.UNDECIDED


def _decided(
    verdict: Decision,
    c_a: int,
    k_a: int,
    pa: float,
    pa_upper: float,
    p_star: float,
    sigma: float,
    target_radius: float,
) -> DecideOutcome:
    """DECIDE's outcome for class ``c_a`` from its bounds (both procedures): pA_lower raised to
    p* when certified (every value <= p* is excluded), pA_upper lowered to p* when not
    certified, radius sigma * Phi^-1(pA_lower), at least the target when certified; an
    abstention when pA_lower < 1/2."""
    if verdict is Decision.CERTIFIED:
        pa = max(pa, p_star)
    elif verdict is Decision.NOT_CERTIFIED:
        pa_upper = min(pa_upper, p_star)
    abstain = pa < 0.5
    radius = 0.0 if abstain else sigma * float(ndtri(pa))  # Phi^-1
    if verdict is Decision.CERTIFIED:
        radius = max(radius, float(target_radius))  # pa >= p*: only float rounding is undone
    reason = AbstainReason.PA_BELOW_HALF.value if abstain else None
    return DecideOutcome(
        None if abstain else c_a, reason, radius, pa, None, k_a, None,
        decision=verdict.value, pa_upper=pa_upper,
    )  # fmt: skip


def check_decide_n(n: int, alpha: float, sigma: float, target_radius: float) -> None:
    """ValueError giving the minimum when n samples could not certify ``target_radius`` even if
    every one of them hit (DECIDE would then only ever say not_certified or undecided)."""
    p_star = validate_target(target_radius, sigma)
    cs = ConfidenceSequence(alpha)
    if cs.min_samples_above(p_star, n) is None:
        need = cs.min_samples_above(p_star, 10**12)
        raise ValueError(
            f"n={n} is too small to certify radius {target_radius:g} at sigma={sigma:g} and "
            f"alpha={alpha:g} even if every sample hits: that needs n >= {need}"
        )


def decide_max_radius(sigma: float, n: int, alpha: float) -> float:
    """The largest radius DECIDE's confidence sequence can give with n samples (all hits)."""
    return max(0.0, sigma * float(ndtri(all_hits_lower(ConfidenceSequence(alpha), n))))


def decide(
    sampler: Sampler,
    x: Tensor,
    sigma: float,
    target_radius: float,
    n0: int,
    n: int,
    alpha: float,
    seed: int,
    *,
    progress: ProgressFn | None = None,
) -> Certificate:
    """DECIDE: is x certified at L2 radius ``target_radius``? Sequential, anytime-valid.

    Selects cA on n0 samples as :func:`certify` does, then draws fresh samples from the same
    per-seed noise stream in growing chunks (:func:`models.sequential.chunk_sizes`: the first
    look when a decision first becomes possible, then +25% per look) and stops at the first
    look where the (1 - alpha) confidence sequence of :mod:`models.sequential` for pA lies
    entirely above p* = Phi(target_radius / sigma) (``decision="certified"``), the sequence of
    the most frequent class lies entirely below it (``"not_certified"``), or n estimation
    samples are spent (``"undecided"``).

    Guarantee, whatever the stopping time: P(certified and the smoothed classifier's radius
    < target_radius) <= alpha, and P(not_certified and that radius >= target_radius) <= alpha.
    ``radius`` = sigma * Phi^-1(pa_lower), the anytime-valid lower bound at the stopping time
    (>= target_radius when certified; 0 with an abstention when pa_lower < 1/2). ``n`` is the
    cap, ``n_used`` the estimation samples drawn, ``max_radius`` the largest radius n samples
    can certify with this sequence. Raises ValueError on bad parameters.

    ``n0 = 0``: no selection stage (:func:`decide_merged`); then ``n`` caps all samples.
    """
    validate(sigma, alpha, n, n0, n0_zero_ok=True)
    if n0 == 0:
        return decide_merged(sampler, x, sigma, target_radius, n, alpha, seed, progress=progress)
    p_star = validate_target(target_radius, sigma)
    check_decide_n(n, alpha, sigma, target_radius)
    cs = ConfidenceSequence(alpha)
    started = time.perf_counter()
    noise = NoiseStream(seed, x.shape, sampler.device)
    selection = sampler.counts(x, sigma, n0, noise, progress)
    c_a = int(torch.argmax(selection))
    selected = time.perf_counter()

    counts = torch.zeros(sampler.num_classes, dtype=torch.long)
    used, verdict = 0, None
    for size in decision_chunks(cs, n, p_star):
        counts = counts + sampler.counts(x, sigma, size, noise, progress)
        used += size
        verdict = decision(cs, int(counts[c_a]), int(counts.max()), used, p_star)
        if verdict is not None:
            break
    estimated = time.perf_counter()

    listed = [int(c) for c in counts]
    out = decide_outcome(listed, c_a, used, n, sigma, alpha, target_radius)
    timings = {
        "selection_s": selected - started,
        "estimation_s": estimated - selected,
        "samples_per_s": (n0 + used) / max(estimated - started, 1e-9),
    }
    return _decide_certificate(
        out, listed, n0, used, n, alpha, sigma, target_radius, seed, list(x.shape), timings,
        decide_max_radius(sigma, n, alpha),
    )  # fmt: skip


def _decide_certificate(
    out: DecideOutcome,
    counts: list[int],
    n0: int,
    used: int,
    n: int,
    alpha: float,
    sigma: float,
    target_radius: float,
    seed: int,
    shape: list[int],
    timings: dict[str, float],
    max_radius: float,
    predictable_hits: int | None = None,
) -> Certificate:
    """A DECIDE run's certificate (both procedures): every forward pass counted in
    ``samples_total`` (n0 selection samples + ``used`` estimation samples)."""
    return Certificate(
        Mode.DECIDE.value,
        out.prediction,
        out.abstain_reason is not None,
        out.abstain_reason,
        out.radius,
        out.pa_lower,
        None,
        count_a=out.count_a,
        count_b=None,
        counts=counts,
        n0=n0,
        n=n,
        alpha=alpha,
        sigma=sigma,
        max_radius=max_radius,
        seed=seed,
        input_shape=shape,
        timings=timings,
        bound=SEQUENCE,
        n_used=used,
        decision=out.decision,
        target_radius=float(target_radius),
        pa_upper=out.pa_upper,
        samples_total=n0 + used,
        predictable_hits=predictable_hits,
    )


def merged_outcome(
    counts: Sequence[int],
    hits: int,
    used: int,
    n: int,
    sigma: float,
    alpha: float,
    target_radius: float,
) -> DecideOutcome:
    """DECIDE's answer with merged selection (n0 = 0) from all ``used`` samples' ``counts`` (one
    per class, K = len(counts)) and the ``hits`` of the predictable class over samples
    2..used (:func:`models.sequential.merged_decision`; docs/DESIGN.md section 5).

    The class returned is the most frequent one (ties: the lower index). ``pa_lower`` is its
    level-alpha/K confidence sequence's lower bound (valid for whichever class is returned, by
    the union bound over the K classes), raised to p* when certified: P(the returned class's
    pA < pa_lower) <= alpha (proof in docs/DESIGN.md). ``pa_upper`` is the level-alpha upper
    bound of the same class, lowered to p* when not certified. ``radius`` = sigma *
    Phi^-1(pa_lower), the target when certified; an abstention when pa_lower < 1/2. ValueError
    when the counts cannot be a stop (no decision before n) or do not fit ``hits``.
    """
    cs = merged_sequence(alpha)
    p_star = validate_target(target_radius, sigma)
    if sum(int(k) for k in counts) != used:
        raise ValueError(f"the counts add up to {sum(counts)}, not {used} samples")
    if not 0 <= hits <= used - FIRST_LEADER:
        raise ValueError(f"predictable_hits {hits!r} must lie in [0, {used - FIRST_LEADER}]")
    c_top, _ = _top_two(counts)
    k_top = int(counts[c_top])
    verdict = _stopped(merged_decision(cs, hits, k_top, used, p_star, len(counts)), used, n)
    pa = class_sequence(alpha, len(counts)).lower(k_top, used)
    return _decided(verdict, c_top, k_top, pa, cs.upper(k_top, used), p_star, sigma, target_radius)


def merged_max_radius(sigma: float, n: int, alpha: float, num_classes: int) -> float:
    """The largest radius merged DECIDE can report with n samples (all hits of one class)."""
    lower = class_sequence(alpha, num_classes).lower(n, n)
    return max(0.0, sigma * float(ndtri(lower)))


def check_merged_n(n: int, alpha: float, sigma: float, target_radius: float) -> None:
    """ValueError giving the minimum when n samples could not certify ``target_radius`` with
    merged selection even if every one of them hit (the first sample only picks a class)."""
    p_star = validate_target(target_radius, sigma)
    cs = ConfidenceSequence(alpha)
    if n <= FIRST_LEADER or cs.min_samples_above(p_star, n - FIRST_LEADER) is None:
        need = FIRST_LEADER + (cs.min_samples_above(p_star, 10**12) or 0)
        raise ValueError(
            f"n={n} is too small to certify radius {target_radius:g} at sigma={sigma:g} and "
            f"alpha={alpha:g} even if every sample hits: that needs n >= {need}"
        )


def decide_merged(
    sampler: Sampler,
    x: Tensor,
    sigma: float,
    target_radius: float,
    n: int,
    alpha: float,
    seed: int,
    *,
    progress: ProgressFn | None = None,
) -> Certificate:
    """DECIDE with no selection stage (n0 = 0): every sample both picks and tests the class.

    Draws from the per-seed noise stream in chunks (:func:`models.sequential.merged_chunks`);
    the samples of each chunk after the first are tested against the class most frequent at
    the chunk's start (predictable: chosen before they are seen) and their hits summed into
    ``predictable_hits``. Stops at the first look where :func:`models.sequential.
    merged_decision` decides, or after n samples (``undecided``). The statistics are
    :func:`merged_outcome`'s; the guarantees are DECIDE's (:func:`decide`), for the class
    returned, and ``pa_lower`` holds for that class at level alpha. ``n`` caps all samples;
    ``n_used`` = ``samples_total`` = the samples drawn. Raises ValueError on bad parameters.
    """
    validate(sigma, alpha, n)
    p_star = validate_target(target_radius, sigma)
    check_merged_n(n, alpha, sigma, target_radius)
    cs = merged_sequence(alpha)
    k = sampler.num_classes
    started = time.perf_counter()
    noise = NoiseStream(seed, x.shape, sampler.device)
    counts = torch.zeros(k, dtype=torch.long)
    used, hits, leader = 0, 0, None
    for size in merged_chunks(cs, n, p_star, k):
        chunk = sampler.counts(x, sigma, size, noise, progress)
        if leader is not None:
            hits += int(chunk[leader])
        counts = counts + chunk
        used += size
        leader = _top_two([int(c) for c in counts])[0]
        if merged_decision(cs, hits, int(counts[leader]), used, p_star, k) is not None:
            break
    estimated = time.perf_counter()
    listed = [int(c) for c in counts]
    out = merged_outcome(listed, hits, used, n, sigma, alpha, target_radius)
    timings = {
        "estimation_s": estimated - started,
        "samples_per_s": used / max(estimated - started, 1e-9),
    }
    return _decide_certificate(
        out, listed, 0, used, n, alpha, sigma, target_radius, seed, list(x.shape), timings,
        merged_max_radius(sigma, n, alpha, k), predictable_hits=hits,
    )  # fmt: skip


def predict(
    sampler: Sampler,
    x: Tensor,
    sigma: float,
    n: int,
    alpha: float,
    seed: int,
    *,
    progress: ProgressFn | None = None,
) -> Certificate:
    """PREDICT(x, n, alpha): abstain unless binomtest(c1, c1 + c2, 0.5) p-value <= alpha (the
    statistics are :func:`predict_outcome`'s)."""
    validate(sigma, alpha, n)
    check_n(Mode.PREDICT, n, alpha)
    started = time.perf_counter()
    noise = NoiseStream(seed, x.shape, sampler.device)
    counts = [int(c) for c in sampler.counts(x, sigma, n, noise, progress)]
    elapsed = time.perf_counter() - started
    out = predict_outcome(counts, alpha)
    return Certificate(
        Mode.PREDICT.value,
        out.prediction,
        out.abstain_reason is not None,
        out.abstain_reason,
        0.0,
        None,
        None,
        count_a=out.count_a,
        count_b=out.count_b,
        counts=counts,
        n0=0,
        n=n,
        alpha=alpha,
        sigma=sigma,
        max_radius=max_radius(sigma, n, alpha),
        seed=seed,
        input_shape=list(x.shape),
        pvalue=out.pvalue,
        timings={"estimation_s": elapsed, "samples_per_s": n / max(elapsed, 1e-9)},
        n_used=n,
        samples_total=n,
    )
