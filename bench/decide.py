"""``dmae-certify bench --decide``: sequential decisions (DECIDE) against fixed-n CERTIFY.

On one model and input set (default: the bundled ``digits-s0.25`` on ``digits:test``), all
through one sampling engine with ``jobs`` concurrent jobs, as the service runs them:

1. Decisions. For every input: fixed-n CERTIFY at ``n`` (seed i), and DECIDE at each target
   radius with cap ``n`` (seed 10^6 + i: an independent run, as a client would get). Reports the
   decisions, median / mean / 90th percentile of ``n_used`` (estimation samples), the samples
   saved against n, and the agreement of "certified" with "CERTIFY's radius >= target". The
   same at ``big_n`` on the first ``big_count`` inputs (a subset on CPU: it says so).
2. Throughput, ``rounds`` interleaved rounds: (i) DECIDE at the first target on every input and
   (ii) fixed-n CERTIFY at ``n`` on ``fixed_count`` inputs, each with ``jobs`` concurrent jobs.
   Reports samples/s (does a crowd of small ``counts()`` calls keep the device as busy as
   fixed-n jobs do?), mean rows per engine batch, and certificates/s; each ratio's median and
   spread (min-max) over the rounds. Each round also runs (iii) DECIDE with a separate
   selection stage of ``n0`` samples on the same inputs and seeds, for the certificates/s of
   merged selection (``decide_n0`` = 0, the default) over it.

DECIDE runs with ``decide_n0`` selection samples (0: merged selection, the mode's default);
fixed-n CERTIFY with ``n0``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from bench.run import describe_device
from models.evaluate import CERTIFY_N0
from models.smoothing import Certificate, certify, decide

if TYPE_CHECKING:
    from worker.engine import Engine

ENGINE_KEY = "bench-decide"
DECIDE_SEED_OFFSET = 1_000_000


@dataclass
class DecideBenchConfig:
    """What to measure; ``None`` sizes take the device's defaults (:meth:`resolved`)."""

    device: str = "auto"
    model: str | None = None
    input: str = "digits:test"
    targets: tuple[float, ...] = (0.25, 0.5)
    n: int | None = None  # cap of DECIDE and n of fixed CERTIFY (default 10,000)
    big_n: int = 100_000
    big_count: int | None = None  # inputs for the big_n comparison (CPU 24, GPU all)
    n0: int = 100  # fixed-n CERTIFY's selection samples, and DECIDE's in comparison (iii)
    decide_n0: int = 0  # DECIDE's selection samples (0: merged selection)
    alpha: float = 0.001
    sigma: float | None = None  # default: the model's training sigma
    jobs: int = 16
    fixed_count: int | None = None  # fixed-n certificates per throughput round (default jobs)
    rounds: int = 3
    max_inputs: int | None = None
    batch_size: int | None = None
    threads: int | None = None

    def resolved(
        self, device: torch.device, inputs: int, model_sigma: float | None
    ) -> DecideBenchConfig:
        out = DecideBenchConfig(**asdict(self))
        out.n = self.n or 10_000
        out.sigma = self.sigma if self.sigma is not None else model_sigma
        count = min(inputs, self.max_inputs or inputs)
        out.max_inputs = count
        default_big = count if device.type == "cuda" else min(count, 24)
        out.big_count = min(count, self.big_count if self.big_count is not None else default_big)
        out.fixed_count = self.fixed_count or self.jobs
        for name in ("n", "n0", "jobs", "rounds", "fixed_count", "max_inputs", "big_n"):
            if getattr(out, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if out.decide_n0 < 0:
            raise ValueError("--decide-n0 must be at least 0")
        if out.big_count < 0:
            raise ValueError("--big-count must be at least 0")
        if out.sigma is None:
            raise ValueError("this model records no training sigma: pass --sigma")
        if not out.targets or any(not (t > 0) for t in out.targets):
            raise ValueError("--targets must be positive radii, e.g. 0.25,0.5")
        return out


def _pool(jobs: int, fn: Callable[[int], Certificate], items: Sequence[int]) -> list[Certificate]:
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(fn, items))


def decision_summary(
    decided: list[Certificate], fixed: list[Certificate], target: float, n: int
) -> dict[str, Any]:
    """n_used statistics and agreement of ``certified`` with the fixed-n radius >= target."""
    used = np.array([c.n_used for c in decided], dtype=float)
    total = np.array([c.n0 + (c.n_used or 0) for c in decided], dtype=float)
    certified = np.array([c.decision == "certified" for c in decided])
    fixed_ok = np.array([c.radius >= target for c in fixed])
    agree = certified == fixed_ok
    return {
        "target_radius": target,
        "n": n,
        "inputs": len(decided),
        "decisions": {
            d: sum(c.decision == d for c in decided)
            for d in ("certified", "not_certified", "undecided")
        },
        "fixed_certified": int(fixed_ok.sum()),
        "n_used_median": float(np.median(used)),
        "n_used_mean": float(used.mean()),
        "n_used_p90": float(np.percentile(used, 90)),
        "n_used_max": float(used.max()),
        # two savings, two names: estimation samples only, and every forward pass (selection
        # included) against fixed-n CERTIFY with its n0 = 100
        "estimation_samples_saved": n / float(used.mean()),
        "total_samples_saved": (CERTIFY_N0 + n) / float(total.mean()),
        "samples_total_median": float(np.median(total)),
        "samples_total_mean": float(total.mean()),
        "agreement": float(agree.mean()),
        "disagreements": {
            "decide_only": int((certified & ~fixed_ok).sum()),
            "fixed_only": int((~certified & fixed_ok).sum()),
        },
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class _Runs:
    """Certificates of ``xs`` through one engine: fixed-n CERTIFY and DECIDE runs, timed over
    ``cfg.jobs`` concurrent jobs."""

    def __init__(self, engine: Engine, xs: list[Tensor], cfg: DecideBenchConfig):
        assert cfg.sigma is not None
        self.engine, self.xs, self.cfg, self.sigma = engine, xs, cfg, cfg.sigma

    def fixed(self, size: int) -> Callable[[int], Certificate]:
        """CERTIFY of input i at n = ``size`` (seed i)."""
        engine, xs, cfg, sigma = self.engine, self.xs, self.cfg, self.sigma
        return lambda i: certify(
            engine.sampler(ENGINE_KEY), xs[i], sigma, cfg.n0, size, cfg.alpha, i
        )

    def decide(
        self, target: float, cap: int, selection: int | None = None
    ) -> Callable[[int], Certificate]:
        """DECIDE of input i at ``target`` with cap ``cap`` (seed 10^6 + i); ``selection``:
        its selection samples (default ``cfg.decide_n0``)."""
        engine, xs, cfg, sigma = self.engine, self.xs, self.cfg, self.sigma
        n0 = cfg.decide_n0 if selection is None else selection
        return lambda i: decide(
            engine.sampler(ENGINE_KEY), xs[i], sigma, target, n0, cap, cfg.alpha,
            DECIDE_SEED_OFFSET + i,
        )  # fmt: skip

    def timed(self, fn: Callable[[int], Certificate], items: Sequence[int]) -> dict[str, Any]:
        """The certificates of ``items``, seconds, samples/s, certificates/s, rows/batch."""
        engine = self.engine
        before = dict(engine.stats)
        started = time.perf_counter()
        certs = _pool(self.cfg.jobs, fn, items)
        elapsed = time.perf_counter() - started
        batches = engine.stats["batches"] - before["batches"]
        rows = engine.stats["rows"] - before["rows"]
        samples = sum(c.n0 + (c.n_used if c.n_used is not None else c.n) for c in certs)
        return {
            "certs": certs,
            "seconds": elapsed,
            "samples_per_s": samples / elapsed,
            "certificates_per_s": len(certs) / elapsed,
            "rows_per_batch": rows / max(batches, 1),
        }


def _decisions(
    runs: _Runs, log: Callable[[str], None]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Part 1: (fixed-n CERTIFY at n, DECIDE summaries at n, DECIDE summaries at big_n)."""
    cfg, xs = runs.cfg, runs.xs
    assert cfg.n is not None and cfg.big_count is not None
    n = cfg.n
    everything = range(len(xs))
    log(f"fixed-n CERTIFY, n={n:,}, on {len(xs)} inputs")
    fixed = runs.timed(runs.fixed(n), everything)
    decisions = []
    for target in cfg.targets:
        log(f"DECIDE at target radius {target:g}, cap n={n:,}")
        out = runs.timed(runs.decide(target, n), everything)
        decisions.append(
            {
                **decision_summary(out["certs"], fixed["certs"], target, n),
                "seconds": out["seconds"],
            }
        )
    big = []
    if cfg.big_count > 0:
        subset = range(cfg.big_count)
        log(f"fixed-n CERTIFY and DECIDE at n={cfg.big_n:,} on {cfg.big_count} inputs")
        big_fixed = runs.timed(runs.fixed(cfg.big_n), subset)["certs"]
        for target in cfg.targets:
            out = runs.timed(runs.decide(target, cfg.big_n), subset)
            big.append(decision_summary(out["certs"], big_fixed, target, cfg.big_n))
    return fixed, decisions, big


def _throughput_rounds(runs: _Runs, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Part 2: per round, DECIDE (merged and with n0 selection) and fixed-n CERTIFY figures."""
    cfg, xs = runs.cfg, runs.xs
    assert cfg.n is not None and cfg.fixed_count is not None
    n, n0 = cfg.n, cfg.n0
    everything = range(len(xs))
    rounds = []
    target = cfg.targets[0]
    fixed_items = [i % len(xs) for i in range(cfg.fixed_count)]
    for r in range(cfg.rounds):
        seq = runs.timed(runs.decide(target, n), everything)
        fix = runs.timed(runs.fixed(n), fixed_items)
        staged = runs.timed(runs.decide(target, n, n0), everything)
        row = {
            "staged_certificates_per_s": staged["certificates_per_s"],
            "staged_samples_per_s": staged["samples_per_s"],
            "decide_samples_per_s": seq["samples_per_s"],
            "fixed_samples_per_s": fix["samples_per_s"],
            "decide_certificates_per_s": seq["certificates_per_s"],
            "fixed_certificates_per_s": fix["certificates_per_s"],
            "decide_rows_per_batch": seq["rows_per_batch"],
            "fixed_rows_per_batch": fix["rows_per_batch"],
        }
        rounds.append(row)
        log(
            f"round {r + 1}/{cfg.rounds}: samples/s decide {seq['samples_per_s']:,.0f} "
            f"fixed {fix['samples_per_s']:,.0f}; certificates/s decide "
            f"{seq['certificates_per_s']:.2f} fixed {fix['certificates_per_s']:.3f} "
            f"decide n0={n0} {staged['certificates_per_s']:.2f}"
        )
    return rounds


def _ratios(rounds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median and spread over the rounds of each throughput ratio and certificates/s."""
    return {
        "samples_per_s_decide_over_fixed": _spread(
            [r["decide_samples_per_s"] / r["fixed_samples_per_s"] for r in rounds]
        ),
        "certificates_per_s_decide_over_fixed": _spread(
            [r["decide_certificates_per_s"] / r["fixed_certificates_per_s"] for r in rounds]
        ),
        "certificates_per_s_decide_over_staged": _spread(
            [r["decide_certificates_per_s"] / r["staged_certificates_per_s"] for r in rounds]
        ),
        "decide_certificates_per_s": _spread([r["decide_certificates_per_s"] for r in rounds]),
        "staged_certificates_per_s": _spread([r["staged_certificates_per_s"] for r in rounds]),
    }


def run_decide_benchmark(
    cfg: DecideBenchConfig, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run both parts (module docstring); returns the JSON-ready result."""
    from bench.run import _loadavg, load_bench_model
    from models.data import open_inputs
    from models.runtime import pick_device
    from worker.engine import Engine

    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model_name = cfg.model or "digits-s0.25"
    bm = load_bench_model(model_name)  # a checkpoint, or a random-weight preset (throughput)
    model, meta = bm.module, bm.meta
    inputs = open_inputs(cfg.input, meta.input_size)
    cfg = cfg.resolved(device, len(inputs), meta.sigma)
    assert cfg.n is not None and cfg.sigma is not None and cfg.max_inputs is not None
    xs: list[Tensor] = [inputs[i][0] for i in range(cfg.max_inputs)]
    load_before = _loadavg()
    log(f"device {describe_device(device)}; model {model_name}; {len(xs)} inputs of {cfg.input}")

    with Engine(device, batch_size=cfg.batch_size) as engine:
        engine.register(ENGINE_KEY, model, meta.num_classes)
        runs = _Runs(engine, xs, cfg)
        log("warming up")
        runs.timed(runs.fixed(min(cfg.n, 1000)), range(min(len(xs), cfg.jobs)))
        fixed, decisions, big = _decisions(runs, log)
        rounds = _throughput_rounds(runs, log)
        engine_batch = engine.batch_size(ENGINE_KEY)

    return {
        "device": describe_device(device),
        "device_type": device.type,
        "model": model_name,
        "input": cfg.input,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "load_average_before_after": [load_before, _loadavg()],
        "settings": {
            **{k: v for k, v in asdict(cfg).items() if k not in ("device", "model")},
            "engine_batch": engine_batch,
            "decide_seed_offset": DECIDE_SEED_OFFSET,
        },
        "fixed_n_seconds": fixed["seconds"],
        "decisions": decisions,
        "big_n": big,
        "rounds": rounds,
        "ratios": _ratios(rounds),
    }


def format_decide_report(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"device: {result['device']}; model {result['model']} on {result['input']} "
        f"({s['max_inputs']} inputs), sigma={s['sigma']:g}, n0={s['n0']} "
        f"(DECIDE: {s['decide_n0']}), alpha={s['alpha']:g}, "
        f"{s['jobs']} concurrent jobs; load average before/after "
        f"{result['load_average_before_after']}",
        "",
        f"{'target':>7} {'n':>8} {'inputs':>6} {'certified':>9} {'not_cert':>8} {'undecided':>9} "
        f"{'n_used med':>10} {'mean':>8} {'p90':>8} {'total med':>9} {'est saved':>9} "
        f"{'all saved':>9} {'agree':>7}",
    ]
    for d in result["decisions"] + result["big_n"]:
        c = d["decisions"]
        lines.append(
            f"{d['target_radius']:>7g} {d['n']:>8,} {d['inputs']:>6} {c['certified']:>9} "
            f"{c['not_certified']:>8} {c['undecided']:>9} {d['n_used_median']:>10,.0f} "
            f"{d['n_used_mean']:>8,.0f} {d['n_used_p90']:>8,.0f} "
            f"{d['samples_total_median']:>9,.0f} {d['estimation_samples_saved']:>8.1f}x "
            f"{d['total_samples_saved']:>8.1f}x "
            f"{100 * d['agreement']:>6.1f}%"
        )
    lines.append(
        "(agree: DECIDE certified <=> fixed-n CERTIFY radius >= target, independent seeds; "
        "est saved: n / mean n_used, estimation samples only; all saved: fixed-n CERTIFY's "
        "100 + n over DECIDE's mean n0 + n_used, every forward pass)"
    )
    if result["big_n"] and result["big_n"][0]["inputs"] < s["max_inputs"]:
        lines.append(f"(n={s['big_n']:,} rows: the first {s['big_count']} inputs only)")
    lines.append("")
    r = result["ratios"]
    last = result["rounds"][-1]
    lines.append(
        f"throughput, {len(result['rounds'])} interleaved rounds (DECIDE at "
        f"{s['targets'][0]:g} on {s['max_inputs']} inputs vs fixed n={s['n']:,} on "
        f"{s['fixed_count']}); rows per batch (last round): decide "
        f"{last['decide_rows_per_batch']:.0f}, fixed {last['fixed_rows_per_batch']:.0f} "
        f"of {s['engine_batch']}"
    )
    for name, label in (
        ("samples_per_s_decide_over_fixed", "samples/s, decide / fixed"),
        ("certificates_per_s_decide_over_fixed", "certificates/s, decide / fixed"),
        ("certificates_per_s_decide_over_staged", f"certificates/s, decide / n0={s['n0']}"),
        ("decide_certificates_per_s", "certificates/s, decide"),
        ("staged_certificates_per_s", f"certificates/s, decide n0={s['n0']}"),
    ):
        q = r[name]
        lines.append(
            f"  {label:<32} median {q['median']:.2f}  (min {q['min']:.2f}, max {q['max']:.2f})"
        )
    return "\n".join(lines)
