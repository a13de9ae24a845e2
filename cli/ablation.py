"""``dmae-certify train ablation``: the DMAE paper's ablation, at digits scale.

For every seed and sigma it trains, with the same fine-tuning recipe, epochs and seed:

(a) DMAE pre-training + consistency fine-tuning (the bundled digits models' recipe),
(b) MAE pre-training (sigma 0, loss on the masked patches) + the same fine-tuning,
(c) a random encoder (no pre-training) + the same fine-tuning,
(d) a random encoder + Cohen et al.'s Gaussian augmentation (one noisy copy, plain
    cross-entropy: no consistency terms, no label smoothing),

certifies digits:test with ``dmae-certify certify`` and writes a Markdown table of certified
accuracy and average certified radius (mean +- sample standard deviation over the seeds).
Every step is a ``dmae-certify`` command run in this process (``--print-commands`` lists them
as a shell script); a step whose output exists is skipped and an interrupted training run is
resumed, so the whole ablation can be restarted after a kill.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RADII = (0.0, 0.25, 0.5, 0.75, 1.0)
CHECKPOINT = "checkpoint.safetensors"
STATE = "state.pt"
TIMES = "times.json"
RESULTS = "results.json"
TABLE = "table.md"


@dataclass(frozen=True)
class Variant:
    key: str
    recipe: str  # the recipe name the checkpoint records (models.training.recipes)
    label: str
    pretraining: str | None  # key of PRETRAINING, None for a random encoder
    finetune: tuple[str, ...] = ()


PRETRAINING = {
    "dmae": ("--sigma", "0.25"),
    "mae": ("--sigma", "0", "--loss-on", "masked"),
}
SCRATCH = ("--pretrained", "none", "--arch", "digits")
GAUSSIAN = ("--copies", "1", "--lbd", "0", "--eta", "0", "--label-smoothing", "0")
VARIANTS = {
    v.key: v
    for v in (
        Variant("a", "dmae+consistency", "DMAE pre-training + consistency", "dmae"),
        Variant("b", "mae+consistency", "MAE pre-training + consistency", "mae"),
        Variant("c", "scratch+consistency", "no pre-training + consistency", None, SCRATCH),
        Variant(
            "d", "scratch+gaussian", "no pre-training + Gaussian (Cohen)", None, SCRATCH + GAUSSIAN
        ),
    )
}


@dataclass
class Sizes:
    """The knobs that differ between the full ablation and its smoke form."""

    pretrain_epochs: int = 200
    pretrain_warmup: int = 20
    finetune_epochs: int = 100
    finetune_warmup: int = 10
    eval_every: int = 10
    eval_images: int = 100
    eval_n: int = 100
    images: int = -1  # digits:test images to certify (-1: all 360)
    n0: int = 100
    n: int = 10_000
    alpha: float = 0.001


SMOKE = Sizes(
    pretrain_epochs=1, pretrain_warmup=0, finetune_epochs=1, finetune_warmup=0, eval_every=1,
    eval_images=5, eval_n=20, images=6, n0=10, n=100,
)  # fmt: skip


@dataclass
class Step:
    """One ``dmae-certify`` command and the file that exists once it has completed."""

    name: str
    stage: str  # pretrain, finetune or certify
    argv: list[str]
    done: Path
    resumable: Path | None = None
    rows: int = 0  # certify: rows the finished TSV holds

    def finished(self) -> bool:
        if not self.done.is_file():
            return False
        if self.stage != "certify":
            return True
        with open(self.done, encoding="utf-8") as f:
            return sum(1 for _ in f) - 1 == self.rows

    def command(self) -> list[str]:
        argv = list(self.argv)
        if self.resumable is not None and self.resumable.is_file():
            argv.append("--resume")
        return argv


@dataclass
class Plan:
    out: Path
    seeds: list[int]
    sigmas: list[float]
    variants: list[Variant]
    sizes: Sizes
    threads: int
    steps: list[Step] = field(default_factory=list)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="directory for every run and table")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; smoke 0,1)")
    p.add_argument("--sigmas", default="0.25,0.5", help="noise levels (default %(default)s)")
    p.add_argument(
        "--variants",
        default="a,b,c,d",
        help="a: DMAE+consistency, b: MAE+consistency, c: scratch+consistency, "
        "d: scratch+Gaussian (default %(default)s)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"1 epoch per stage, {SMOKE.images} images, n={SMOKE.n}: checks the pipeline, "
        "measures nothing",
    )
    p.add_argument("--images", type=int, default=None, help="digits:test images (default all)")
    p.add_argument("--n", type=int, default=None, help="certification samples (default 10000)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument(
        "--print-commands",
        action="store_true",
        help="print the steps as a shell script and run nothing",
    )


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{what} must be comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"--{what} must be positive numbers, got {text!r}")
    return values


def make_plan(args: argparse.Namespace) -> Plan:
    sizes = Sizes(**vars(SMOKE)) if args.smoke else Sizes()
    if args.images is not None:
        sizes.images = args.images
    if args.n is not None:
        sizes.n = args.n
    seeds_text = args.seeds or ("0,1" if args.smoke else "0,1,2")
    parts = [v.strip() for v in seeds_text.split(",") if v.strip()]
    if not parts or not all(v.isdigit() for v in parts):
        raise ValueError(f"--seeds must be comma-separated whole numbers, got {seeds_text!r}")
    seeds = [int(v) for v in parts]
    sigmas = _floats(args.sigmas, "sigmas")
    keys = [k.strip() for k in args.variants.split(",") if k.strip()]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown or not keys:
        raise ValueError(f"--variants must name some of a,b,c,d, got {args.variants!r}")
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    plan = Plan(args.out, seeds, sigmas, [VARIANTS[k] for k in keys], sizes, args.threads)
    plan.steps = _steps(plan)
    return plan


def _run_dir(plan: Plan, name: str) -> Path:
    return plan.out / name


def _model_name(variant: Variant, sigma: float, seed: int) -> str:
    return f"{variant.key}-{variant.recipe}-s{sigma:g}-seed{seed}"


def _steps(plan: Plan) -> list[Step]:
    z = plan.sizes
    threads = ["--threads", str(plan.threads), "--no-progress"]
    steps: list[Step] = []
    needed = sorted({v.pretraining for v in plan.variants if v.pretraining is not None})
    for seed in plan.seeds:
        for kind in needed:
            run = _run_dir(plan, f"pretrain-{kind}-seed{seed}")
            argv = [
                "train", "pretrain", "--data", "digits:train", "--arch", "digits",
                *PRETRAINING[kind], "--epochs", str(z.pretrain_epochs),
                "--warmup-epochs", str(z.pretrain_warmup), "--batch-size", "128",
                "--blr", "1.5e-3", "--seed", str(seed), *threads, "--out", str(run),
                "--name", f"{kind}-pretrain-seed{seed}",
            ]  # fmt: skip
            name = f"pretrain {kind} seed {seed}"
            steps.append(Step(name, "pretrain", argv, run / CHECKPOINT, run / STATE))
    for seed in plan.seeds:
        for sigma in plan.sigmas:
            for v in plan.variants:
                name = _model_name(v, sigma, seed)
                run = _run_dir(plan, name)
                start: tuple[str, ...] = ()
                if v.pretraining:
                    source = _run_dir(plan, f"pretrain-{v.pretraining}-seed{seed}") / CHECKPOINT
                    start = ("--pretrained", str(source))
                argv = [
                    "train", "finetune", "--data", "digits:train", "--val-data", "digits:test",
                    *start, *v.finetune, "--sigma", f"{sigma:g}",
                    "--epochs", str(z.finetune_epochs), "--warmup-epochs", str(z.finetune_warmup),
                    "--batch-size", "128", "--blr", "2e-3", "--layer-decay", "0.75",
                    "--eval-every", str(z.eval_every), "--eval-images", str(z.eval_images),
                    "--eval-n", str(z.eval_n), "--seed", str(seed), *threads,
                    "--out", str(run), "--name", name,
                ]  # fmt: skip
                step = Step(f"finetune {name}", "finetune", argv, run / CHECKPOINT, run / STATE)
                steps.append(step)
                tsv = plan.out / f"certify-{name}.tsv"
                argv = [
                    "certify", "--input", "digits:test", "--checkpoint", str(run / CHECKPOINT),
                    "--n0", str(z.n0), "--n", str(z.n), "--alpha", f"{z.alpha:g}",
                    "--seed", str(1000 * seed), "--max", str(z.images), "--no-progress",
                    "--out", str(tsv),
                ]  # fmt: skip
                rows = 360 if z.images < 0 else min(z.images, 360)
                steps.append(Step(f"certify {name}", "certify", argv, tsv, rows=rows))
    return steps


def shell_script(plan: Plan) -> str:
    lines = ["#!/bin/sh", "# dmae-certify train ablation: the steps it runs, in order", "set -e"]
    lines += [shlex.join(["dmae-certify", *s.argv]) for s in plan.steps]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    if args.print_commands:
        print(shell_script(plan), end="")
        return 0
    import torch

    from cli import main as cli_main

    torch.set_num_threads(plan.threads)
    plan.out.mkdir(parents=True, exist_ok=True)
    times_path = plan.out / TIMES
    times: dict[str, float] = json.loads(times_path.read_text()) if times_path.is_file() else {}
    started = time.perf_counter()
    for number, step in enumerate(plan.steps, start=1):
        if step.finished():
            print(f"[{number}/{len(plan.steps)}] {step.name}: done already", file=sys.stderr)
            continue
        argv = step.command()
        print(f"[{number}/{len(plan.steps)}] dmae-certify {shlex.join(argv)}", file=sys.stderr)
        t0 = time.perf_counter()
        code = cli_main(argv)
        if code != 0:
            raise ValueError(f"step {step.name!r} failed (exit {code}); fix it, then rerun")
        times[step.name] = times.get(step.name, 0.0) + time.perf_counter() - t0
        times_path.write_text(json.dumps(times, indent=1))
    results = summarise(plan, times)
    (plan.out / RESULTS).write_text(json.dumps(results, indent=1))
    table = markdown(plan, results)
    (plan.out / TABLE).write_text(table)
    print(table)
    print(
        f"ablation finished in {time.perf_counter() - started:.0f} s this time; "
        f"table: {plan.out / TABLE}, per-run figures: {plan.out / RESULTS}",
        file=sys.stderr,
    )
    return 0


# ---------------------------------------------------------------- figures


def tsv_metrics(path: Path) -> dict[str, Any]:
    """Certified accuracy at :data:`RADII` and the average certified radius of one TSV.

    Radii are recomputed at full precision from (count_a, n, alpha, sigma): radius =
    sigma * Phi^-1(pA_lower), pA_lower the one-sided Clopper-Pearson bound (Cohen et al. 2019,
    CERTIFY), 0 for an abstention. The average certified radius (Zhai et al. 2020) is the mean
    over all images of the radius of correct predictions (0 for wrong or abstained ones).
    """
    from scipy.stats import norm

    from models.evaluate import certified_accuracy, read_tsv
    from models.smoothing import clopper_pearson_lower

    rows = read_tsv(path)
    for r in rows:
        if r.predict >= 0:
            exact = r.sigma * float(norm.ppf(clopper_pearson_lower(r.count_a, r.n, r.alpha)))
            if abs(exact - r.radius) > 1e-4:
                raise ValueError(f"{path}: row {r.idx} radius {r.radius} is not CERTIFY's")
            r.radius = exact
    accuracy = certified_accuracy(rows, RADII)
    return {
        "images": len(rows),
        "certified_accuracy": dict(zip([f"{r:g}" for r in RADII], accuracy, strict=True)),
        "acr": sum(r.radius for r in rows if r.correct) / max(len(rows), 1),
        "abstained": sum(r.predict < 0 for r in rows),
        "max_radius": max((r.max_radius for r in rows), default=0.0),
        "certify_s": sum(r.time for r in rows),
    }


def summarise(plan: Plan, times: dict[str, float]) -> dict[str, Any]:
    from models.checkpoints import read_meta

    runs = []
    for seed in plan.seeds:
        for sigma in plan.sigmas:
            for v in plan.variants:
                name = _model_name(v, sigma, seed)
                meta = read_meta(_run_dir(plan, name) / CHECKPOINT)
                recorded = meta.training.get("recipe_name")
                if recorded != v.recipe:
                    raise ValueError(f"{name}: the checkpoint records recipe {recorded!r}")
                metrics = tsv_metrics(plan.out / f"certify-{name}.tsv")
                pretrain_s = times.get(f"pretrain {v.pretraining} seed {seed}", 0.0)
                runs.append(
                    {
                        "variant": v.key, "recipe": v.recipe, "sigma": sigma, "seed": seed,
                        **metrics,
                        "clean_acc": meta.training.get("final_epoch", {}).get("clean_acc"),
                        "finetune_s": times.get(f"finetune {name}", 0.0),
                        "pretrain_s": pretrain_s,
                        "wall_certify_s": times.get(f"certify {name}", 0.0),
                    }
                )  # fmt: skip
    z = plan.sizes
    return {
        "seeds": plan.seeds,
        "sigmas": plan.sigmas,
        "n0": z.n0,
        "n": z.n,
        "alpha": z.alpha,
        "pretrain_epochs": z.pretrain_epochs,
        "finetune_epochs": z.finetune_epochs,
        "wall_s": {
            stage: sum(t for k, t in times.items() if k.startswith(stage))
            for stage in ("pretrain", "finetune", "certify")
        },
        "runs": runs,
    }


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def _cell(values: Sequence[float], scale: float, digits: int, floor: bool = False) -> str:
    mean, sd = mean_sd([v * scale for v in values])
    text = _floor(mean, digits) if floor else f"{mean:.{digits}f}"  # radii: rounded down
    return text if sd is None else f"{text} ± {sd:.{digits}f}"


def _floor(value: float, digits: int) -> str:
    return f"{math.floor(value * 10**digits) / 10**digits:.{digits}f}"


def markdown(plan: Plan, results: dict[str, Any]) -> str:
    """The table: one row per (sigma, variant), mean ± sd over the seeds, in %."""
    from models.smoothing import max_radius

    head = ["sigma", "recipe", *[f"r = {r:g}" for r in RADII], "ACR", "clean acc.", "fine-tune s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ranking = []
    for sigma in plan.sigmas:
        by_variant = []
        for v in plan.variants:
            runs = [r for r in results["runs"] if r["sigma"] == sigma and r["variant"] == v.key]
            acc = [_cell([r["certified_accuracy"][f"{x:g}"] for r in runs], 100, 1) for x in RADII]
            clean = [r["clean_acc"] for r in runs if r["clean_acc"] is not None]
            cells = [
                f"{sigma:g}", f"({v.key}) `{v.recipe}`", *acc,
                _cell([r["acr"] for r in runs], 1, 3, floor=True),
                _cell(clean, 100, 1) if clean else "",
                f"{statistics.fmean(r['finetune_s'] for r in runs):.0f}",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
            by_variant.append((statistics.fmean(r["acr"] for r in runs), v.key))
        order = " > ".join(f"({k})" for _, k in sorted(by_variant, reverse=True))
        ranking.append(f"sigma {sigma:g}: {order}")
    wall = results["wall_s"]
    seeds = ", ".join(str(s) for s in results["seeds"])
    notes = [
        "",
        f"Certified accuracy (%) on {results['runs'][0]['images']} digits:test images and the "
        f"average certified radius (ACR), mean ± sample sd over seeds {seeds}; "
        f"n0 = {results['n0']}, n = {results['n']:,}, alpha = {results['alpha']:g}; "
        f"{results['pretrain_epochs']} pre-training and {results['finetune_epochs']} "
        "fine-tuning epochs. Clean accuracy: the base classifier on digits:test at the end of "
        "fine-tuning.",
        "",
        "Ranking by mean ACR: " + "; ".join(ranking) + ".",
        "",
        "Largest radius any certificate can reach at these n and alpha (sigma x "
        "Phi^-1(alpha^(1/n)), Cohen et al. 2019): "
        + "; ".join(
            f"sigma {sigma:g}: {_floor(max_radius(sigma, results['n'], results['alpha']), 2)}"
            for sigma in plan.sigmas
        )
        + ".",
        "",
        f"Wall time (summed over runs): pre-training {wall['pretrain']:.0f} s, fine-tuning "
        f"{wall['finetune']:.0f} s, certification {wall['certify']:.0f} s.",
    ]
    return "\n".join(lines + notes) + "\n"
