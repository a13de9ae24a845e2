"""``dmae-certify bench``: reference loop vs engine vs service, on one model and device."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure sampling throughput: reference loop, engine (1 and N jobs), HTTP service",
        description=(
            "Measure, in one run on one model and device: (a) a Cohen-style reference loop "
            "(fp32, batch 400), (b) the engine with one job, (c) the engine with --jobs "
            "concurrent jobs, (d) one certificate through the HTTP service. Prints samples/s, "
            "seconds per certificate at n=10,000 and 100,000, and the ratios b/a and c/b, each "
            "as the median and spread over interleaved rounds. Defaults are CI-sized on CPU "
            "and n=100,000 on a GPU. With --decide: sequential DECIDE against fixed-n CERTIFY "
            "on an input set (n_used, agreement, samples/s and certificates/s)."
        ),
    )
    _model_options(p)
    _sampling_options(p)
    _engine_options(p)
    _service_options(p)
    _decide_options(p)
    p.set_defaults(func=run)


def _model_options(p: argparse.ArgumentParser) -> None:
    """Where and on what the benchmark runs."""
    p.add_argument(
        "--device", default="auto", help="auto (default: CUDA if available), cpu, cuda or cuda:N"
    )
    p.add_argument(
        "--model",
        default=None,
        help="bundled model name or checkpoint path, or a random-weight preset: tiny, vit-b16, "
        "vit-l16 (default: the bundled digits-s0.25 if present, else tiny)",
    )


def _sampling_options(p: argparse.ArgumentParser) -> None:
    """Sample counts, jobs, noise level and rounds of the cases (a) to (c)."""
    p.add_argument("--n", type=int, default=None, help="n of the one-job case (CPU 10000, GPU 1e5)")
    p.add_argument(
        "--n0", type=int, default=100, help="selection samples per certificate (default 100)"
    )
    p.add_argument("--jobs", type=int, default=16, help="concurrent jobs in case (c) (default 16)")
    p.add_argument(
        "--job-n", type=int, default=1000, help="n of each concurrent job (default 1000)"
    )
    p.add_argument(
        "--reference-n",
        type=int,
        default=None,
        help="estimation samples timed for the reference loop (default: --n on CPU, 10000 on GPU)",
    )
    p.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="noise level (default 0.25; --decide: the model's)",
    )
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")


def _engine_options(p: argparse.ArgumentParser) -> None:
    """The engine's batch, precision and compilation."""
    p.add_argument("--batch-size", type=int, default=None, help="engine batch (default: auto)")
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="engine precision: auto is bf16 autocast on CUDA, fp32 on CPU",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the engine's model")
    p.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode, e.g. max-autotune-no-cudagraphs, reduce-overhead",
    )


def _service_options(p: argparse.ArgumentParser) -> None:
    """Case (d), the HTTP service; CPU threads and the JSON output."""
    p.add_argument(
        "--service",
        choices=("auto", "off"),
        default="auto",
        help="case (d): auto starts the embedded service if available; off skips it",
    )
    p.add_argument("--service-url", default=None, help="measure this running service instead")
    p.add_argument("--api-key", default=None, help="API key for --service-url")
    p.add_argument("--service-model", default=None, help="registered model name to request")
    p.add_argument("--service-n", type=int, default=None, help="n of the service's job (def. --n)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")


def _decide_options(p: argparse.ArgumentParser) -> None:
    """The --decide group: sequential DECIDE against fixed-n CERTIFY."""
    d = p.add_argument_group("--decide: sequential decisions against fixed-n CERTIFY")
    d.add_argument(
        "--decide",
        action="store_true",
        help="benchmark DECIDE (default model digits-s0.25 on digits:test; --n is DECIDE's cap "
        "and fixed CERTIFY's n, default 10000; --sigma defaults to the model's)",
    )
    d.add_argument("--input", default="digits:test", help="inputs (default %(default)s)")
    d.add_argument(
        "--targets",
        default="0.25,0.5",
        help="target radii, comma-separated (default %(default)s)",
    )
    d.add_argument("--big-n", type=int, default=100_000, help="the large n compared (default 1e5)")
    d.add_argument(
        "--big-count",
        type=int,
        default=None,
        help="inputs compared at --big-n (default: 24 on CPU, all on a GPU; 0 skips)",
    )
    d.add_argument(
        "--decide-n0",
        type=int,
        default=0,
        help="DECIDE's selection samples (default 0: merged selection); each throughput round "
        "also runs DECIDE with --n0 for the comparison",
    )
    d.add_argument("--max-inputs", type=int, default=None, help="use the first N inputs only")
    d.add_argument(
        "--fixed-count",
        type=int,
        default=None,
        help="fixed-n certificates per throughput round (default: --jobs)",
    )


def run(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from bench.run import BenchConfig, format_report, run_benchmark

    if args.decide:
        return run_decide(args)
    args.sigma = 0.25 if args.sigma is None else args.sigma
    cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig)})
    result = run_benchmark(cfg, log=lambda msg: print(msg, flush=True))
    print()
    print(format_report(result))
    _write_json(args.json, result)
    return 0


def run_decide(args: argparse.Namespace) -> int:
    from bench.decide import DecideBenchConfig, format_decide_report, run_decide_benchmark

    try:
        targets = tuple(float(t) for t in args.targets.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"--targets must be comma-separated radii, got {args.targets!r}") from None
    cfg = DecideBenchConfig(
        device=args.device, model=args.model, input=args.input, targets=targets, n=args.n,
        big_n=args.big_n, big_count=args.big_count, n0=args.n0, decide_n0=args.decide_n0,
        alpha=args.alpha, sigma=args.sigma, jobs=args.jobs, fixed_count=args.fixed_count,
        rounds=args.rounds or 3, max_inputs=args.max_inputs, batch_size=args.batch_size,
        threads=args.threads,
    )  # fmt: skip
    result = run_decide_benchmark(cfg, log=lambda msg: print(msg, flush=True))
    print()
    print(format_decide_report(result))
    _write_json(args.json, result)
    return 0


def _write_json(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path}")
