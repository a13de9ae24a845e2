"""``dmae-certify bench``: the reference loop, the engine and the service, side by side.

One run, one model, one device, four cases:

(a) the reference loop in the style of Cohen et al. (:mod:`bench.reference`),
(b) the engine serving one job (``certify`` with n0 + n samples),
(c) the engine serving ``jobs`` concurrent jobs of ``job_n`` samples each, started together,
(d) the HTTP service: POST /certify, poll GET /jobs/{id} until it succeeds.

Each case reports samples per second and the seconds one certificate takes at n=10,000 and
n=100,000 (n0 + n samples at that rate). The cases run ``rounds`` times interleaved (default 3),
so a noisy neighbour slows all of them alike; each case's best round is reported as its rate,
and each ratio (b/a, c/b, d/b) is taken within every round and reported as the median and
range over the rounds (all rounds are kept in the JSON).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from bench.reference import REFERENCE_BATCH, reference_counts

if TYPE_CHECKING:
    from worker.engine import Engine

PRESET_MODELS = {  # name -> (architecture preset, classes, input size): random weights
    "tiny": ("tiny", 10, 8),
    "vit-b16": ("base", 1000, 224),
    "vit-l16": ("large", 1000, 224),
}
DEFAULT_BUNDLED = "digits-s0.25"
CERT_SIZES = (10_000, 100_000)
ENGINE_KEY = "bench"


@dataclass
class BenchConfig:
    """What to measure. ``None`` sizes take the device's defaults (:meth:`resolved`)."""

    device: str = "auto"
    model: str | None = None
    n: int | None = None  # samples of the one-job case (and the service case)
    n0: int = 100
    jobs: int = 16
    job_n: int = 1000
    reference_n: int | None = None
    sigma: float = 0.25
    alpha: float = 0.001
    rounds: int | None = None
    batch_size: int | None = None
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16
    compile: bool = False
    compile_mode: str | None = None
    service: str = "auto"  # auto (embedded service if available), off
    service_url: str | None = None
    api_key: str | None = None
    service_model: str | None = None
    service_n: int | None = None  # n of the service's timed job (default: n)
    threads: int | None = None  # torch CPU threads (default: torch's own choice)

    def resolved(self, device: torch.device) -> BenchConfig:
        """Fill in device defaults: CI-sized on CPU, n=100,000 on a GPU; check every value."""
        gpu = device.type == "cuda"
        out = BenchConfig(**asdict(self))
        out.n = self.n if self.n is not None else (100_000 if gpu else 10_000)
        out.reference_n = self.reference_n or (min(out.n, 10_000) if gpu else out.n)
        out.rounds = self.rounds or 3
        out.service_n = self.service_n or out.n
        for name in ("n", "n0", "jobs", "job_n", "reference_n", "rounds", "service_n"):
            if getattr(out, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("batch_size", "threads"):
            if getattr(out, name) is not None and getattr(out, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not (out.sigma > 0 and 0 < out.alpha < 0.5):
            raise ValueError("sigma must be positive and alpha in (0, 0.5)")
        if out.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"--dtype must be auto, fp32 or bf16, got {out.dtype!r}")
        if out.service not in ("auto", "off"):
            raise ValueError(f"--service must be auto or off, got {out.service!r}")
        if bool(out.service_url) != bool(out.api_key):
            raise ValueError("--service-url and --api-key go together")
        return out


@dataclass
class BenchModel:
    name: str
    module: nn.Module
    num_classes: int
    input_size: int
    description: str
    meta: Any  # models.checkpoints.CheckpointMeta: what the service case registers


def default_model_name() -> str:
    """The bundled digits model when it ships with the package, else the tiny preset."""
    from models.checkpoints import bundled_models

    return DEFAULT_BUNDLED if DEFAULT_BUNDLED in bundled_models() else "tiny"


def load_bench_model(spec: str) -> BenchModel:
    """A preset with seeded random weights (``tiny``, ``vit-b16``, ``vit-l16``) or a checkpoint."""
    from models.checkpoints import CheckpointMeta, load_classifier_with_meta
    from models.networks import DMAEClassifier, preset

    if spec in PRESET_MODELS:
        arch_name, classes, size = PRESET_MODELS[spec]
        arch = preset(arch_name)
        torch.manual_seed(0)
        net = DMAEClassifier(arch, classes, size).eval()
        params = sum(p.numel() for p in net.parameters())
        desc = (
            f"{spec}: random weights, ViT {arch.embed_dim}x{arch.depth} patch {arch.patch_size} "
            f"at {arch.img_size}, {params / 1e6:.1f}M parameters, input {size}x{size}"
        )
        meta = CheckpointMeta(
            kind="classifier", arch=arch, input_size=size, num_classes=classes,
            classes=[str(i) for i in range(classes)], name=spec,
            source="dmae-certify bench: random weights (seed 0)",
        )  # fmt: skip
        return BenchModel(spec, net, classes, size, desc, meta)
    model, meta = load_classifier_with_meta(spec)
    arch = meta.arch
    desc = (
        f"{meta.name or spec}: checkpoint, ViT {arch.embed_dim}x{arch.depth} patch "
        f"{arch.patch_size} at {arch.img_size}, input {meta.input_size}x{meta.input_size}, "
        f"{meta.num_classes} classes"
    )
    return BenchModel(spec, model, meta.num_classes, meta.input_size, desc, meta)


def bench_input(input_size: int) -> Tensor:
    """A digits test image at 8x8 (what the tiny models see), else a seeded random image."""
    if input_size == 8:
        from models.data import load_digits_split

        return load_digits_split("test")[0][0].clone()
    g = torch.Generator().manual_seed(0)
    return torch.rand((3, input_size, input_size), generator=g)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu: {name}, {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def case_reference(bm: BenchModel, x: Tensor, cfg: BenchConfig, device: torch.device) -> float:
    """(a) samples/s of the Cohen-style loop: n0 selection + reference_n estimation samples."""
    assert cfg.reference_n is not None
    xd = x.to(device)

    def run() -> None:
        reference_counts(bm.module, xd, cfg.sigma, cfg.n0, bm.num_classes)
        reference_counts(bm.module, xd, cfg.sigma, cfg.reference_n or 1, bm.num_classes)

    return (cfg.n0 + cfg.reference_n) / _timed(device, run)


def case_engine(engine: Any, x: Tensor, cfg: BenchConfig, seed: int = 0) -> float:
    """(b) samples/s of one certificate (n0 + n) through the engine and the core."""
    from models.smoothing import certify

    assert cfg.n is not None

    def run() -> None:
        certify(engine.sampler(ENGINE_KEY), x, cfg.sigma, cfg.n0, cfg.n or 1, cfg.alpha, seed)

    return (cfg.n0 + cfg.n) / _timed(engine.device, run)


def case_concurrent(engine: Any, x: Tensor, cfg: BenchConfig) -> float:
    """(c) samples/s of ``jobs`` certificates (n0 + job_n each) started at the same moment."""
    from models.smoothing import certify

    gate = threading.Barrier(cfg.jobs + 1)
    errors: list[BaseException] = []

    def job(i: int) -> None:
        gate.wait()
        try:
            certify(engine.sampler(ENGINE_KEY), x, cfg.sigma, cfg.n0, cfg.job_n, cfg.alpha, 1 + i)
        except BaseException as exc:  # re-raised in the benchmark's thread
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(i,), daemon=True) for i in range(cfg.jobs)]
    for t in threads:
        t.start()

    def run() -> None:
        gate.wait()
        for t in threads:
            t.join()

    elapsed = _timed(engine.device, run)
    if errors:
        raise errors[0]
    return cfg.jobs * (cfg.n0 + cfg.job_n) / elapsed


class ServiceCase:
    """(d) samples/s of one certificate over HTTP, measured once per round.

    The service (embedded, or ``--service-url``) is started once for all rounds and warmed up
    with one job; every measurement submits a new image (the service returns the stored
    certificate for a repeated one). If the service cannot run, every measurement returns
    ``{"note": why}`` and the other cases go on.
    """

    def __init__(self, bm: BenchModel, x: Tensor, cfg: BenchConfig, device: torch.device):
        self.bm, self.x, self.cfg, self.device = bm, x, cfg, device
        self.stack = contextlib.ExitStack()
        self.note: str | None = None
        self.url: str | None = None
        self.key: str | None = None
        self.model: str | None = None
        self.count = itertools.count(1)

    def __enter__(self) -> ServiceCase:
        from bench.service import ServiceUnavailable, embedded_service

        cfg = self.cfg
        if cfg.service == "off" and not cfg.service_url:
            self.note = "skipped (--service off)"
            return self
        try:
            if cfg.service_url and cfg.api_key:
                self.url, self.key, self.model = cfg.service_url, cfg.api_key, cfg.service_model
            else:
                self.url, self.key, self.model = self.stack.enter_context(
                    embedded_service(self.device.type, self.bm.module, self.bm.meta, cfg.threads)
                )
            self._submit(min(cfg.service_n or 1, 1000))  # warm-up: model load, first batch
        except ServiceUnavailable as exc:
            self.note = f"skipped: {exc}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def _submit(self, n: int) -> dict[str, Any]:
        from bench.service import certify_over_http, png_bytes

        # A new input each time (the service returns the stored certificate for a repeated
        # one): two pixels set from a generator seeded by the clock and a counter.
        g = torch.Generator().manual_seed(time.time_ns() + next(self.count))
        y = self.x.clone()
        y[:, 0, :2] = torch.rand(y[:, 0, :2].shape, generator=g)
        assert self.url is not None and self.key is not None
        return certify_over_http(
            self.url, self.key, png_bytes(y), n0=self.cfg.n0, n=n, sigma=self.cfg.sigma,
            alpha=self.cfg.alpha, model=self.model,
        )  # fmt: skip

    def measure(self) -> dict[str, Any]:
        from bench.service import ServiceUnavailable

        if self.note is not None:
            return {"note": self.note}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # leave the service the memory the other cases cached
        n = self.cfg.service_n or 1
        try:
            out = self._submit(n)
        except ServiceUnavailable as exc:
            return {"note": f"skipped: {exc}"}
        return {
            "samples_per_s": (self.cfg.n0 + n) / out["seconds"],
            "seconds": out["seconds"],
            "enqueue_s": out["enqueue_s"],
            "job_timings": out["job"].get("certificate", {}).get("timings"),
        }


def _engine(cfg: BenchConfig, device: torch.device) -> Engine:
    from worker.engine import Engine

    autocast: Any = {"auto": "auto", "fp32": None, "bf16": torch.bfloat16}[cfg.dtype]
    return Engine(
        device, batch_size=cfg.batch_size, autocast=autocast, compile=cfg.compile,
        compile_mode=cfg.compile_mode,
    )  # fmt: skip


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every case; returns the JSON-ready result (see the module docstring)."""
    from models.runtime import pick_device

    device = pick_device(cfg.device)
    cfg = cfg.resolved(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    load_before = _loadavg()
    assert cfg.n is not None and cfg.rounds is not None
    bm = load_bench_model(cfg.model or default_model_name())
    bm.module.to(device)
    x = bench_input(bm.input_size)
    log(f"device {describe_device(device)}; model {bm.description}")

    with _engine(cfg, device) as engine, ServiceCase(bm, x, cfg, device) as service_case:
        engine.register(ENGINE_KEY, bm.module, bm.num_classes)
        small = {"n": min(cfg.n, 400), "reference_n": min(cfg.reference_n or 1, 400)}
        warm = BenchConfig(**{**asdict(cfg), **small})
        log("warming up (first calls, batch-size choice" + (", compile)" if cfg.compile else ")"))
        case_reference(bm, x, warm, device)
        case_engine(engine, x, warm)
        if service_case.note:
            log(f"service case {service_case.note}")
        rounds, services = _rounds(engine, service_case, bm, x, cfg, device, log)
        engine_batch = engine.batch_size(ENGINE_KEY)
        engine_stats = dict(engine.stats)
    result = {
        "device": describe_device(device),
        "device_type": device.type,
        "model": bm.name,
        "model_description": bm.description,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "load_average_before_after": [load_before, _loadavg()],
    }
    return {
        **result,
        **_rates(cfg, rounds, services),
        "settings": _settings(cfg, device, engine_batch),
        "engine_stats": engine_stats,
        "rounds": rounds,
        "service_rounds": services,
    }


def _rounds(
    engine: Engine,
    service_case: ServiceCase,
    bm: BenchModel,
    x: Tensor,
    cfg: BenchConfig,
    device: torch.device,
    log: Callable[[str], None],
) -> tuple[list[dict[str, float]], list[dict[str, Any]]]:
    """``cfg.rounds`` interleaved rounds of every case: (samples/s per case, service records)."""
    assert cfg.rounds is not None
    rounds: list[dict[str, float]] = []
    services: list[dict[str, Any]] = []
    for r in range(cfg.rounds):
        row = {
            "reference": case_reference(bm, x, cfg, device),
            "engine": case_engine(engine, x, cfg, seed=r),
            "engine_concurrent": case_concurrent(engine, x, cfg),
        }
        services.append(service_case.measure())
        if services[-1].get("samples_per_s"):
            row["service"] = services[-1]["samples_per_s"]
        rounds.append(row)
        note = services[-1].get("note")
        log(
            f"round {r + 1}/{cfg.rounds}: "
            + ", ".join(f"{k} {v:,.0f}" for k, v in row.items())
            + (f"; service {note}" if note and not service_case.note else "")
        )
    return rounds, services


def _rates(
    cfg: BenchConfig, rounds: list[dict[str, float]], services: list[dict[str, Any]]
) -> dict[str, Any]:
    """Each case's best rate, the service's best round, the ratios (of the best rates and per
    round) and the seconds per certificate at each of CERT_SIZES."""
    best = {k: max(r[k] for r in rounds) for k in ("reference", "engine", "engine_concurrent")}
    measured = [s for s in services if s.get("samples_per_s")]
    service = max(measured, key=lambda s: s["samples_per_s"]) if measured else services[-1]
    rates: dict[str, float | None] = {**best, "service": service.get("samples_per_s")}
    return {
        "reference_samples_per_s": rates["reference"],
        "engine_samples_per_s": rates["engine"],
        "engine_concurrent_samples_per_s": rates["engine_concurrent"],
        "service_samples_per_s": rates["service"],
        "service_note": service.get("note"),
        "service_enqueue_s": service.get("enqueue_s"),
        "service_job_timings": service.get("job_timings"),
        "ratios": {
            "engine_over_reference": _ratio(rates["engine"], rates["reference"]),
            "concurrent_over_engine": _ratio(rates["engine_concurrent"], rates["engine"]),
            "service_over_engine": _ratio(rates["service"], rates["engine"]),
        },
        "ratio_rounds": {
            name: _spread([r[a] / r[b] for r in rounds if a in r and b in r])
            for name, (a, b) in RATIOS.items()
        },
        "seconds_per_certificate": {
            case: {str(n): (cfg.n0 + n) / rate if rate else None for n in CERT_SIZES}
            for case, rate in rates.items()
        },
    }


def _settings(cfg: BenchConfig, device: torch.device, engine_batch: int | None) -> dict[str, Any]:
    """The resolved settings the result records."""
    dtype = {"auto": "bf16 autocast" if device.type == "cuda" else "fp32"}.get(cfg.dtype, cfg.dtype)
    return {
        "n": cfg.n,
        "n0": cfg.n0,
        "jobs": cfg.jobs,
        "job_n": cfg.job_n,
        "reference_n": cfg.reference_n,
        "reference_batch": REFERENCE_BATCH,
        "engine_batch": engine_batch,
        "engine_dtype": dtype,
        "compile": cfg.compile,
        "compile_mode": cfg.compile_mode,
        "sigma": cfg.sigma,
        "alpha": cfg.alpha,
        "rounds": cfg.rounds,
        "service_n": cfg.service_n,
    }  # fmt: skip


def _loadavg() -> float | None:
    """1-minute load average: how busy the machine was (other users slow every case)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


RATIOS = {  # ratio name -> (numerator case, denominator case), measured within each round
    "engine_over_reference": ("engine", "reference"),
    "concurrent_over_engine": ("engine_concurrent", "engine"),
    "service_over_engine": ("service", "engine"),
}


def _spread(values: list[float]) -> dict[str, Any] | None:
    """Median and range of a ratio over the rounds (None when no round measured it)."""
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "rounds": values,
    }


def format_report(result: dict[str, Any]) -> str:
    """The printed table: samples/s and seconds per certificate per case, then the ratios."""
    s = result["settings"]
    labels = {
        "reference": f"(a) reference loop (fp32, batch {s['reference_batch']}, host counts)",
        "engine": f"(b) engine, one job (batch {s['engine_batch']}, {s['engine_dtype']}"
        + (", compiled)" if s["compile"] else ")"),
        "engine_concurrent": f"(c) engine, {s['jobs']} concurrent jobs of n={s['job_n']:,}",
        "service": "(d) service, HTTP submit -> poll until done",
    }
    lines = [
        f"device: {result['device']}",
        f"model:  {result['model_description']}",
        f"n0={s['n0']:,}, one-job n={s['n']:,}, reference n={s['reference_n']:,}, "
        f"service n={s['service_n']:,}, best of {s['rounds']} round(s), "
        f"{result['cpu_threads']} CPU threads, load average before/after "
        f"{result['load_average_before_after']}",
        "",
        f"{'case':<62}{'samples/s':>12}{'s/cert n=10k':>14}{'s/cert n=100k':>15}",
    ]
    for case, label in labels.items():
        rate = result[f"{case}_samples_per_s"]
        if rate is None:
            lines.append(f"{label:<62}{result.get('service_note') or 'skipped'}")
            continue
        per = result["seconds_per_certificate"][case]
        lines.append(f"{label:<62}{rate:>12,.0f}{per['10000']:>14.2f}{per['100000']:>15.2f}")
    q = result["ratio_rounds"]
    lines.append("")
    lines.append(
        f"ratios, median over {s['rounds']} interleaved round(s) (min-max), each within a round:"
    )
    labels = {
        "engine_over_reference": "b/a (engine vs reference)",
        "concurrent_over_engine": f"c/b ({s['jobs']} jobs vs one)",
        "service_over_engine": "d/b (service vs engine)",
    }
    for name, label in labels.items():
        if q.get(name) is not None:
            v = q[name]
            lines.append(f"  {label} = {v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})")
    return "\n".join(lines)
