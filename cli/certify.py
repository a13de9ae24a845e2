"""``dmae-certify certify | predict | decide``: offline runs of the certification core."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

from cli import DEFAULT_MODEL
from models.modes import Mode, RunSpec, get_mode, variant

NORMS = ("imagenet", "cifar")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        required=True,
        help="image file, folder of images, ImageFolder root, digits:train|test or "
        "mnist:train|test",
    )
    p.add_argument(
        "--checkpoint",
        default=DEFAULT_MODEL,
        help="checkpoint path (project .safetensors or official DMAE .pth) or the "
        "name of a bundled model (default: %(default)s)",
    )
    p.add_argument(
        "--sigma",
        type=float,
        default=None,
        help="noise level in [0,1] pixel space (default: the model's training sigma)",
    )
    p.add_argument("--n", type=int, default=10_000, help="estimation samples (default %(default)s)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    p.add_argument("--batch", type=int, default=1000, help="noisy copies per forward pass")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="base seed; input number i uses seed + i (default %(default)s)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--skip", type=int, default=1, help="take every SKIP-th input")
    p.add_argument("--max", type=int, default=-1, help="stop after this many inputs (-1: all)")
    p.add_argument("--out", default=None, help="write per-input results as TSV here")
    p.add_argument("--plot", default=None, help="write a PNG of the accuracy curve here")
    p.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="official files only: native input size (default: model resolution)",
    )
    p.add_argument(
        "--norm",
        choices=NORMS,
        default="imagenet",
        help="official files only: mean/std of the training data",
    )
    p.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="official files only: attention heads (default: those of the architecture the "
        "file's args.model names, else width / 64 when the width is a multiple of 64)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="a file of the input folder that is not a supported image (by its suffix or its "
        "bytes: .avif, .heic, damaged, outside the ImageFolder layout) refuses the whole run "
        "(exit 1, naming each); with this flag it is skipped instead, listed on stderr and in "
        "the TSV's '# skipped' footer. Hidden and system files (.DS_Store, Thumbs.db) are "
        "always left out",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows already in --out (a run that was interrupted) and certify only the "
        "other inputs; the same seeds make the result equal to an uninterrupted run",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print each input's certificate as one JSON line on stdout (the summary goes to "
        "stderr)",
    )


def register(sub: Any) -> None:
    c = sub.add_parser("certify", help="CERTIFY: smoothed prediction with a provable L2 radius")
    _common(c)
    c.add_argument("--n0", type=int, default=100, help="selection samples (default %(default)s)")
    c.add_argument(
        "--top2",
        action="store_true",
        help="radius from both top classes with simultaneous (Bonferroni) bounds",
    )
    c.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop each input's sampling after this long; a run stopped before n takes its "
        "radius from the anytime-valid confidence sequence (the TSV's bound column says so)",
    )
    c.set_defaults(func=run, mode="certify", target_radius=None)
    p = sub.add_parser("predict", help="PREDICT: smoothed prediction with a binomial test")
    _common(p)
    p.set_defaults(func=run, mode="predict", n0=0, top2=False, target_radius=None, time_budget=None)
    d = sub.add_parser(
        "decide",
        help="DECIDE: is each input certified at --target-radius? Sequential, stops early",
    )
    _common(d)
    d.add_argument(
        "--n0",
        type=int,
        default=0,
        help="selection samples (default 0: class selection merged into the sequential test)",
    )
    d.add_argument(
        "--target-radius",
        type=float,
        required=True,
        help="the L2 radius to decide about; --n is the cap on estimation samples",
    )
    d.set_defaults(func=run, mode="decide", top2=False, time_budget=None)


@dataclass
class Setup:
    """Everything the per-input loop needs, prepared (and validated) once."""

    mode: Mode  # the run's mode (the subcommand's, or its --top2 variant)
    sigma: float
    meta: Any  # models.checkpoints.CheckpointMeta
    sampler: Any  # models.smoothing.BatchSampler
    inputs: Any  # models.data.InputSet
    indices: list[int]
    device: Any


def prepare(args: argparse.Namespace) -> Setup:
    """Load the model and the inputs; ValueError with the reason for anything unusable."""
    from models.checkpoints import load_classifier_with_meta
    from models.data import open_inputs
    from models.networks import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
    from models.runtime import autocast_dtype, pick_device
    from models.smoothing import BatchSampler, validate_budget

    mean, std = (CIFAR_MEAN, CIFAR_STD) if args.norm == "cifar" else (IMAGENET_MEAN, IMAGENET_STD)
    model, meta = load_classifier_with_meta(
        args.checkpoint, input_size=args.input_size, mean=mean, std=std, num_heads=args.num_heads
    )
    sigma = args.sigma if args.sigma is not None else meta.sigma
    if sigma is None:
        raise ValueError("this checkpoint records no training sigma: pass --sigma")
    mode = variant(args.mode, args.top2)
    mode.validate(sigma, args.alpha, args.n, args.n0)
    validate_budget(args.time_budget)
    mode.check_samples(args.n, args.alpha)
    mode.check_reachable(args.n, args.alpha, sigma, args.n0, args.target_radius)
    if args.batch < 1 or args.skip < 1:
        raise ValueError("--batch and --skip must be at least 1")
    inputs = open_inputs(args.input, meta.input_size, meta.classes or None, args.skip_invalid)
    indices = list(range(0, len(inputs), args.skip))
    if args.max >= 0:
        indices = indices[: args.max]
    device = pick_device(args.device)
    model = model.to(device)
    sampler = BatchSampler(model, meta.num_classes, args.batch, device, autocast_dtype(device))
    return Setup(mode, sigma, meta, sampler, inputs, indices, device)


def certify_one(
    args: argparse.Namespace, setup: Setup, i: int, sample: Any, progress: Any
) -> tuple[Any, Any]:
    """Run the core on input number ``i`` (seed ``--seed + i``); returns (Row, Certificate)."""
    from models.evaluate import Row

    x, started = sample.input.tensor, time.perf_counter()
    spec = RunSpec(
        mode=setup.mode.name, sigma=setup.sigma, alpha=args.alpha, n0=args.n0, n=args.n,
        seed=args.seed + i, target_radius=args.target_radius, time_budget_s=args.time_budget,
    )  # fmt: skip
    cert = setup.mode.run(setup.sampler, x, spec, progress)
    row = Row(
        idx=i,
        label=sample.label,
        predict=-1 if cert.prediction is None else cert.prediction,
        radius=cert.radius,
        time=time.perf_counter() - started,
        count_a=cert.count_a,
        n=cert.n,
        pa_lower=cert.pa_lower,
        n0=cert.n0,
        samples_total=cert.samples_total,
        sigma=setup.sigma,
        alpha=args.alpha,
        max_radius=cert.max_radius,
        name=sample.name,
        tensor_sha256=sample.input.tensor_sha256,
        preprocessing=list(sample.input.steps),
        warnings=list(sample.input.warnings),
        decision=cert.decision or "",
        n_used=cert.n_used,
        target_radius=cert.target_radius,
        bound=cert.bound or "",
    )
    return row, cert


def outcome(cert: Any, meta: Any) -> str:
    """One input's result for people: the radius and pA bound rounded down, never up."""
    from models.evaluate import round_down

    used = "" if cert.n_used in (None, cert.n) else f" n_used={cert.n_used}"
    mode = get_mode(cert.mode)
    if mode.decides:
        head = f"{cert.decision} at r={cert.target_radius:g}{used}"
        if cert.abstained:
            return f"{head} (abstain: {cert.abstain_reason})"
        cls, r = meta.class_name(cert.prediction), round_down(cert.radius)
        return f"{head} {cls} radius={r} pA_lower={round_down(cert.pa_lower)}"
    if cert.abstained:
        return f"abstain ({cert.abstain_reason}){used}"
    text = str(meta.class_name(cert.prediction))
    if not mode.has_radius:
        return text
    r, pa = round_down(cert.radius), round_down(cert.pa_lower)
    return f"{text} radius={r} pA_lower={pa}{used}"


def decide_summary(rows: list[Any], n: int, n0: int) -> str:
    """DECIDE over a set: decisions, certified accuracy at the target, samples drawn against a
    fixed-n CERTIFY of every input (n0 + n each). Fractions rounded down."""
    from models.evaluate import decision_stats, round_down

    if not rows:
        return "decide over 0 inputs"
    stats = decision_stats(rows, n, n0)
    labelled = stats.certified_accuracy is not None
    lines = [
        f"decide at r={rows[0].target_radius:g} over {len(rows)} input(s), n cap {n}:",
        "certified\tnot_certified\tundecided\t"
        + ("certified_accuracy\t" if labelled else "")
        + "n_used_median\tn_used_mean\ttotal_samples_saved",
        f"{round_down(stats.certified, 3)}\t{round_down(stats.not_certified, 3)}\t"
        f"{round_down(stats.undecided, 3)}\t"
        + (f"{round_down(stats.certified_accuracy or 0.0, 3)}\t" if labelled else "")
        + f"{stats.n_used_median:g}\t{stats.n_used_mean:.1f}\t"
        f"{stats.samples_saved:.1f}x (all forward passes: n0 + n_used against fixed-n "
        f"CERTIFY's 100 + {n})",
    ]
    return "\n".join(lines)


def _interrupted() -> None:  # pragma: no cover - replaced by tests
    """Hook called after each input (tests raise KeyboardInterrupt here)."""


def _done_before(args: argparse.Namespace, setup: Setup) -> list[Any]:
    """With --resume: the rows already in --out, checked to come from the same run."""
    from models.evaluate import read_tsv

    if not args.resume:
        return []
    if not args.out:
        raise ValueError("--resume needs --out: the TSV whose finished rows are kept")
    try:
        rows = read_tsv(args.out)
    except FileNotFoundError:
        return []
    names = {i: setup.inputs.name(i) for i in setup.indices}
    for row in rows:
        same = (row.sigma, row.alpha, row.n) == (setup.sigma, args.alpha, args.n) and (
            row.n0 == setup.mode.selection_samples(args.n0)
            and row.target_radius == args.target_radius
        )
        if not same or names.get(row.idx) != row.name:
            raise ValueError(
                f"--resume: {args.out} row {row.idx} ({row.name}) is not from this run "
                "(other inputs, sigma, alpha, n or n0); write to a new --out instead"
            )
    return rows


def run(args: argparse.Namespace) -> int:
    if args.plot and not variant(args.mode, args.top2).has_curve:
        raise ValueError(
            "--plot draws certified accuracy against the radius: PREDICT certifies no radius "
            "and DECIDE answers at one radius; use certify for a curve"
        )
    from models.data import SetRefused

    try:
        setup = prepare(args)
    except SetRefused as exc:  # the same exit as a file refused for its bytes, below
        print(f"dmae-certify {args.command}: error: {exc}", file=sys.stderr)
        return 1
    rows: list[Any] = _done_before(args, setup)
    found = _todo(args, setup, {r.idx for r in rows})
    if isinstance(found, int):
        return found
    todo, skipped = found
    _header(args, setup, rows)
    interrupted = _certify_all(args, setup, todo, rows, skipped)
    if interrupted:
        print(
            f"interrupted after {len(rows)} of {len(setup.indices)} input(s)"
            + (f"; finish with the same command and --resume (rows are in {args.out})"
               if args.out else ""),
            file=sys.stderr,
        )  # fmt: skip
    if skipped and not rows:
        print(
            f"dmae-certify {args.command}: error: nothing could be certified: "
            f"{len(skipped)} file(s) skipped",
            file=sys.stderr,
        )
        return 1
    _summary(args, setup, rows, skipped)
    return 130 if interrupted else 0


def _todo(
    args: argparse.Namespace, setup: Setup, done: set[int]
) -> tuple[list[int], list[tuple[str, str]]] | int:
    """(inputs to certify, files skipped with why), every file read once first; or exit 1 for
    a file that is not a supported image without --skip-invalid."""
    todo = [i for i in setup.indices if i not in done]
    skipped = [(s.name, s.reason) for s in setup.inputs.skipped]
    if bad := setup.inputs.unreadable(todo):  # every file read once before any is certified
        if not args.skip_invalid:
            from models.data import SKIP_INVALID, refusal

            what = f"{bad[0].name}: {bad[0].reason}" if len(setup.inputs) == 1 else (
                refusal(bad, SKIP_INVALID))  # fmt: skip
            print(f"dmae-certify {args.command}: error: {what}", file=sys.stderr)
            return 1
        unusable = {s.name for s in bad}
        todo = [i for i in todo if setup.inputs.name(i) not in unusable]
        skipped += [(s.name, s.reason) for s in bad]
    for name, reason in skipped:
        print(f"warning: skipped {name}: {reason}", file=sys.stderr)
    return todo, skipped


def _header(args: argparse.Namespace, setup: Setup, rows: list[Any]) -> None:
    """The run's parameters on stderr (and where the class names come from)."""
    from models.smoothing import SPACE

    size = setup.meta.input_size
    print(
        f"# {setup.mode.name} {len(setup.indices)} input(s) with {args.checkpoint} on "
        f"{setup.device}: sigma={setup.sigma:g} n0={args.n0} n={args.n} alpha={args.alpha:g}; "
        f"radius in L2 over (3, {size}, {size}) {SPACE}"
        + (f"; resuming: {len(rows)} already in {args.out}" if args.resume else ""),
        file=sys.stderr,
    )
    if setup.meta.classes_source:
        print(f"# class names: {setup.meta.classes_source}", file=sys.stderr)


def _certify_all(
    args: argparse.Namespace,
    setup: Setup,
    todo: list[int],
    rows: list[Any],
    skipped: list[tuple[str, str]],
) -> bool:
    """Certify each input of ``todo``, appending to ``rows`` (and --out) and printing each
    outcome; an input unreadable by now joins ``skipped``. True when interrupted (Ctrl-C)."""
    from tqdm import tqdm

    from models.evaluate import TsvWriter
    from models.images import ImageError

    per_sample = len(todo) == 1
    bar = tqdm(
        total=(args.n0 + args.n) if per_sample else len(todo),
        disable=args.no_progress,
        unit="sample" if per_sample else "img",
        file=sys.stderr,
        dynamic_ncols=True,
    )
    out = TsvWriter(args.out, append=args.resume) if args.out else None
    try:
        for i in todo:
            try:
                sample = setup.inputs.load(i)
            except ImageError as exc:  # changed since it was checked: say so, go on
                skipped.append((setup.inputs.name(i), str(exc)))
                tqdm.write(f"warning: skipped {exc}", file=sys.stderr)
                bar.update(0 if per_sample else 1)
                continue
            row, cert = certify_one(args, setup, i, sample, bar.update if per_sample else None)
            rows.append(row)
            if out is not None:
                out.write(row)  # flushed: a kill loses at most the input in progress
            _show(args, setup, row, cert)
            if not per_sample:
                bar.update(1)
            _interrupted()
    except KeyboardInterrupt:
        return True
    finally:
        bar.close()
        if out is not None:
            out.footer(skipped)
            out.close()
    return False


def _show(args: argparse.Namespace, setup: Setup, row: Any, cert: Any) -> None:
    """One input's warnings, then its outcome: a line for people, or with --json the
    certificate as one JSON line."""
    import json

    from tqdm import tqdm

    meta = setup.meta
    for warning in row.warnings:
        tqdm.write(f"{row.name}: warning: {warning}", file=sys.stderr)
    if args.json:
        record = {"idx": row.idx, "name": row.name, "label": row.label, **cert.to_dict()}
        record["label_name"] = meta.class_name(row.label) if row.label >= 0 else None
        record["prediction_name"] = meta.class_name(cert.prediction)
        record["tensor_sha256"] = row.tensor_sha256
        print(json.dumps(record), flush=True)
    else:
        truth = meta.class_name(row.label) if row.label >= 0 else "-"
        tqdm.write(f"{row.name}\tlabel={truth}\t{outcome(cert, meta)}", file=sys.stdout)
        sys.stdout.flush()


def _summary(
    args: argparse.Namespace, setup: Setup, rows: list[Any], skipped: list[tuple[str, str]]
) -> None:
    """The set's result: decisions for a deciding mode, else (certified) accuracy by radius
    (radius 0 only for a mode without radius); and the --plot curve."""
    from models.evaluate import (
        certified_accuracy,
        certified_fraction,
        curve_title,
        default_radii,
        plot_curve,
        round_down,
    )
    from models.smoothing import max_radius

    summary = sys.stderr if args.json else sys.stdout
    if setup.mode.decides:
        print(decide_summary(rows, args.n, args.n0), file=summary)
        return
    labelled = any(r.label >= 0 for r in rows)
    radii = default_radii(max_radius(setup.sigma, args.n, args.alpha))
    values = (certified_accuracy if labelled else certified_fraction)(rows, radii)
    what = "certified accuracy" if labelled else "fraction certified (no labels)"
    if not setup.mode.has_radius:
        radii, what = [0.0], "accuracy" if labelled else "fraction predicted (no labels)"
        values = values[:1]
    seconds = sum(r.time for r in rows)
    print(
        f"{what} over {len(rows)} input(s), {seconds:.1f} s "
        f"({seconds / max(len(rows), 1):.2f} s per input)"
        + (
            f", {len(skipped)} file(s) skipped (not supported images, listed on stderr)"
            if skipped
            else ""
        )  # fmt: skip
        + ":",
        file=summary,
    )
    print("radius\t" + "\t".join(f"{r:g}" for r in radii), file=summary)
    print("value\t" + "\t".join(round_down(v, 3) for v in values), file=summary)
    if args.plot and rows:
        plot_curve(args.plot, rows, curve_title(args.checkpoint, setup.sigma, args.n, args.alpha))
