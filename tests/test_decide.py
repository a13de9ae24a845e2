"""Behaviour of DECIDE and of CERTIFY's time budget a user relies on: what a certificate says,
where its samples come from, parameter validation, and the engine (models/smoothing.py)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from itertools import accumulate

import pytest
import torch
from conftest import KnownProbabilityClassifier
from scipy.stats import norm
from torch import Tensor

from models.networks import DMAEClassifier, preset
from models.sequential import NAME, ConfidenceSequence, decision_chunks
from models.smoothing import (
    AbstainReason,
    BatchSampler,
    Certificate,
    NoiseStream,
    ProgressFn,
    certify,
    decide,
)
from worker.engine import Engine

SIGMA = 0.25


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def known(probs: list[float]) -> tuple[BatchSampler, Tensor]:
    model = KnownProbabilityClassifier(probs, SIGMA)
    return BatchSampler(model, len(probs), batch_size=1000), torch.zeros(1, 2, 2)


# ---------------------------------------------------------------- what a certificate says


def test_a_certified_decision_carries_a_radius_at_least_the_target() -> None:
    sampler, x = known([0.99, 0.01])
    cert = decide(sampler, x, SIGMA, 0.25, 20, 10_000, 0.001, seed=1)
    assert (cert.mode, cert.decision, cert.bound) == ("decide", "certified", NAME)
    assert cert.prediction == 0 and not cert.abstained and cert.abstain_reason is None
    assert cert.target_radius == 0.25 and cert.radius >= 0.25
    assert cert.pa_lower is not None and cert.pa_lower >= norm.cdf(1.0)
    assert cert.radius == pytest.approx(SIGMA * norm.ppf(cert.pa_lower), abs=1e-12)
    assert cert.n == 10_000 and cert.n_used is not None and cert.n_used < 200
    assert sum(cert.counts) == cert.n_used and cert.count_a == cert.counts[0]
    cs = ConfidenceSequence(0.001)
    assert cert.pa_lower == pytest.approx(cs.lower(cert.count_a, cert.n_used), abs=1e-15)
    assert cert.pa_upper == cs.upper(cert.count_a, cert.n_used)
    assert cert.max_radius == pytest.approx(SIGMA * norm.ppf(cs.lower(10_000, 10_000)))
    assert set(cert.timings) == {"selection_s", "estimation_s", "samples_per_s"}
    assert cert.to_dict()["decision"] == "certified"


def test_a_refuted_decision_keeps_the_smaller_radius_it_can_prove() -> None:
    """pA = 0.7 < p* = 0.84: not certified at 0.25, but still a (smaller) valid radius."""
    sampler, x = known([0.7, 0.3])
    certs = [decide(sampler, x, SIGMA, 0.25, 50, 10_000, 0.001, seed=s) for s in range(20)]
    assert all(c.decision == "not_certified" for c in certs)
    for c in certs:
        assert c.pa_upper is not None and c.pa_upper <= norm.cdf(1.0)
        assert c.radius < 0.25
        if c.abstained:
            assert c.prediction is None and c.radius == 0.0 and c.pa_lower < 0.5
            assert c.abstain_reason == AbstainReason.PA_BELOW_HALF.value
        else:
            assert c.prediction == 0 and c.radius == pytest.approx(SIGMA * norm.ppf(c.pa_lower))
    assert any(not c.abstained for c in certs)


def test_an_undecidable_input_spends_the_cap_and_says_so() -> None:
    p = float(norm.cdf(1.0))  # exactly at the boundary: no decision is right
    sampler, x = known([p, 1 - p])
    cert = decide(sampler, x, SIGMA, 0.25, 20, 500, 0.001, seed=3)
    assert cert.decision == "undecided" and cert.n_used == 500 and cert.n == 500
    assert cert.pa_lower < p < cert.pa_upper


def test_a_wrong_class_is_never_certified() -> None:
    """n0 = 1 sometimes selects class 1 (p = 0.1): that class is never certified at 0.25."""
    sampler, x = known([0.9, 0.1])
    for seed in range(40):
        cert = decide(sampler, x, SIGMA, 0.25, 1, 2000, 0.001, seed=seed)
        if cert.decision == "certified":
            assert cert.prediction == 0


# ---------------------------------------------------------------- where the samples come from


def test_estimation_samples_continue_the_seeds_stream_after_the_selection_ones() -> None:
    model = KnownProbabilityClassifier([0.8, 0.15, 0.05], SIGMA)
    x = torch.zeros(1, 2, 2)
    cert = decide(BatchSampler(model, 3), x, SIGMA, 0.1, 30, 5000, 0.01, seed=7)
    assert cert.n_used is not None
    noise = NoiseStream(7, x.shape).take(30 + cert.n_used)
    with torch.no_grad():
        classes = model(x + SIGMA * noise).argmax(1)
    selection = torch.bincount(classes[:30], minlength=3)
    estimation = torch.bincount(classes[30:], minlength=3)
    assert cert.counts == estimation.tolist()
    assert cert.prediction in (None, int(selection.argmax()))


def test_the_stopping_look_is_one_of_the_schedules_and_the_progress_adds_up() -> None:
    sampler, x = known([0.95, 0.05])
    seen: list[int] = []
    cert = decide(sampler, x, SIGMA, 0.5, 20, 10_000, 0.001, seed=2, progress=seen.append)
    p_star = float(norm.cdf(0.5 / SIGMA))
    looks = list(accumulate(decision_chunks(ConfidenceSequence(0.001), 10_000, p_star)))
    assert cert.n_used in looks and sum(seen) == 20 + cert.n_used


def test_same_seed_same_decision_whatever_the_batch_size() -> None:
    model = KnownProbabilityClassifier([0.9, 0.1], SIGMA)
    x = torch.zeros(1, 2, 2)
    results = {
        b: decide(BatchSampler(model, 2, batch_size=b), x, SIGMA, 0.25, 20, 3000, 0.01, seed=5)
        for b in (1, 37, 128, 4096)
    }
    assert len({(c.decision, c.n_used, tuple(c.counts), c.radius) for c in results.values()}) == 1


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("target", [0, -0.5, math.nan, math.inf, True, "0.25", None])
def test_bad_target_radius_is_refused_with_a_message(target: object) -> None:
    sampler, x = known([0.9, 0.1])
    with pytest.raises(ValueError, match="target radius must be a positive finite number"):
        decide(sampler, x, SIGMA, target, 20, 100, 0.001, 0)  # type: ignore[arg-type]


def test_a_target_no_sample_size_can_reach_is_refused() -> None:
    sampler, x = known([0.9, 0.1])
    with pytest.raises(ValueError, match="no number of samples can certify it"):
        decide(sampler, x, SIGMA, 10 * SIGMA, 20, 100, 0.001, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 0.0}, "alpha must lie in"),
        ({"alpha": 0.7}, "alpha must lie in"),
        ({"n": 0}, "n must be a positive integer"),
        ({"n": 10.5}, "n must be a positive integer"),
        ({"n0": -1}, "n0 must be a non-negative integer"),
        ({"n0": 1.5}, "n0 must be a non-negative integer"),
        ({"sigma": -1.0}, "sigma must be a positive finite number"),
    ],
)
def test_bad_decide_parameters_are_refused(kwargs: dict, message: str) -> None:
    sampler, x = known([0.9, 0.1])
    args = {"sigma": SIGMA, "target_radius": 0.25, "n0": 20, "n": 100, "alpha": 0.001, "seed": 0}
    with pytest.raises(ValueError, match=message):
        decide(sampler, x, **{**args, **kwargs})


@pytest.mark.parametrize("budget", [0, -1.0, math.nan, math.inf, True, "5"])
def test_bad_time_budget_is_refused(budget: object) -> None:
    sampler, x = known([0.9, 0.1])
    with pytest.raises(ValueError, match="time budget must be a positive number of seconds"):
        certify(sampler, x, SIGMA, 20, 100, 0.001, 0, time_budget_s=budget)  # type: ignore[arg-type]


def test_certificates_built_the_old_way_still_work() -> None:
    cert = Certificate("certify", 1, False, None, 0.5, 0.9, None, 90, None, [10, 90], 10, 100,
                       0.01, 0.25, 0.7, 0, [3, 8, 8])  # fmt: skip
    body = cert.to_dict()
    assert body["bound"] is None and body["decision"] is None and body["n_used"] is None


# ---------------------------------------------------------------- CERTIFY with a time budget


class SlowSampler:
    """A sampler whose every counts() call takes ``delay`` seconds more."""

    def __init__(self, inner: BatchSampler, delay: float):
        self.inner, self.delay = inner, delay
        self.num_classes, self.device = inner.num_classes, inner.device
        self.calls: list[int] = []

    def counts(
        self,
        x: Tensor,
        sigma: float,
        num: int,
        noise: NoiseStream,
        progress: ProgressFn | None = None,
    ) -> Tensor:
        time.sleep(self.delay)
        self.calls.append(num)
        return self.inner.counts(x, sigma, num, noise, progress)


def test_a_generous_budget_changes_nothing() -> None:
    sampler, x = known([0.9, 0.1])
    plain = certify(sampler, x, SIGMA, 20, 3000, 0.001, seed=4)
    budgeted = certify(sampler, x, SIGMA, 20, 3000, 0.001, seed=4, time_budget_s=600)
    assert (plain.bound, plain.n_used) == ("clopper-pearson", 3000)
    assert (budgeted.bound, budgeted.n_used) == ("clopper-pearson", 3000)
    assert budgeted.counts == plain.counts and budgeted.radius == plain.radius
    assert budgeted.max_radius == plain.max_radius


@pytest.mark.parametrize("top2", [False, True])
def test_a_run_stopped_by_its_budget_takes_the_anytime_valid_bound(top2: bool) -> None:
    inner, x = known([0.95, 0.04, 0.01])
    sampler = SlowSampler(inner, delay=0.02)
    started = time.perf_counter()
    cert = certify(sampler, x, SIGMA, 20, 10**7, 0.001, seed=6, top2=top2, time_budget_s=0.15)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.15 + 0.1  # overrun: at most about one chunk
    assert cert.n_used is not None and cert.n_used < 10**7 and cert.bound == NAME
    assert cert.n_used == sum(sampler.calls[1:]) == sum(cert.counts)
    level = 0.0005 if top2 else 0.001
    assert cert.pa_lower == ConfidenceSequence(level).lower(cert.count_a, cert.n_used)
    assert not cert.abstained and cert.prediction == 0
    if top2:
        pb = ConfidenceSequence(0.001 / 4).upper(max(cert.counts[1:]), cert.n_used)
        assert cert.pb_upper == pytest.approx(pb)
    else:
        assert cert.radius == pytest.approx(SIGMA * norm.ppf(cert.pa_lower))
        assert cert.max_radius == pytest.approx(
            SIGMA * norm.ppf(ConfidenceSequence(0.001).lower(cert.n_used, cert.n_used))
        )


# ---------------------------------------------------------------- on the engine


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return DMAEClassifier(preset("tiny"), 10, input_size=8).eval()


def test_decide_on_the_engine_equals_the_plain_loop_and_leaves_no_work_behind(tiny) -> None:
    x = torch.rand((3, 8, 8), generator=torch.Generator().manual_seed(3))
    plain = decide(BatchSampler(tiny, 10), x, 0.25, 0.1, 20, 4000, 0.01, seed=8)
    with Engine("cpu", batch_size=256) as engine:
        engine.register("tiny", tiny, 10)
        on_engine = decide(engine.sampler("tiny"), x, 0.25, 0.1, 20, 4000, 0.01, seed=8)
        assert engine.pending() == 0
        assert engine.stats["rows"] == 20 + on_engine.n_used  # nothing drawn past the stop
    assert (on_engine.decision, on_engine.n_used, on_engine.counts) == (
        plain.decision,
        plain.n_used,
        plain.counts,
    )


def test_concurrent_decide_jobs_share_batches_and_keep_their_own_counts(tiny) -> None:
    """Sequential jobs of different lengths and a fixed-n job on one engine: every job's result
    equals its solo run; the engine drew exactly the samples the jobs used."""
    xs = [torch.rand((3, 8, 8), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    solo = [decide(BatchSampler(tiny, 10), x, 0.25, 0.1, 20, 3000, 0.01, seed=i)
            for i, x in enumerate(xs)]  # fmt: skip
    fixed = certify(BatchSampler(tiny, 10), xs[0], 0.25, 20, 3000, 0.01, seed=99)
    results: dict[int, Certificate] = {}
    with Engine("cpu", batch_size=256, pipeline_depth=2) as engine:
        engine.register("tiny", tiny, 10)
        gate = threading.Barrier(len(xs) + 1)

        def job(i: int) -> None:
            gate.wait()
            if i < len(xs):
                results[i] = decide(engine.sampler("tiny"), xs[i], 0.25, 0.1, 20, 3000, 0.01, i)
            else:
                results[i] = certify(engine.sampler("tiny"), xs[0], 0.25, 20, 3000, 0.01, 99)

        threads = [threading.Thread(target=job, args=(i,)) for i in range(len(xs) + 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert engine.pending() == 0
        used = sum(20 + (r.n_used or 0) for r in results.values())
        assert engine.stats["rows"] == used
    for i, cert in enumerate(solo):
        assert (results[i].decision, results[i].n_used, results[i].counts) == (
            cert.decision,
            cert.n_used,
            cert.counts,
        )
    assert results[len(xs)].counts == fixed.counts
