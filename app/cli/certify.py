"""``dmae-certify certify`` and ``dmae-certify predict``: offline runs of the certification core."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

NORMS = ("imagenet", "cifar")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        required=True,
        help="image file, folder of images, ImageFolder root, or digits:train|test",
    )
    p.add_argument(
        "--checkpoint",
        default="digits-s0.25",
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
        help="official files only: attention heads (default: width / 64)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(sub: Any) -> None:
    c = sub.add_parser("certify", help="CERTIFY: smoothed prediction with a provable L2 radius")
    _common(c)
    c.add_argument("--n0", type=int, default=100, help="selection samples (default %(default)s)")
    c.add_argument(
        "--top2",
        action="store_true",
        help="radius from both top classes with simultaneous (Bonferroni) bounds",
    )
    c.set_defaults(func=run, mode="certify")
    p = sub.add_parser("predict", help="PREDICT: smoothed prediction with a binomial test")
    _common(p)
    p.set_defaults(func=run, mode="predict", n0=0, top2=False)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from models.checkpoints import load_classifier_with_meta
    from models.data import open_inputs
    from models.evaluate import (
        Row,
        certified_accuracy,
        certified_fraction,
        default_radii,
        plot_curve,
        write_tsv,
    )
    from models.networks import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
    from models.runtime import autocast_dtype, pick_device
    from models.smoothing import SPACE, BatchSampler, certify, max_radius, predict, validate

    mean, std = (CIFAR_MEAN, CIFAR_STD) if args.norm == "cifar" else (IMAGENET_MEAN, IMAGENET_STD)
    model, meta = load_classifier_with_meta(
        args.checkpoint, input_size=args.input_size, mean=mean, std=std, num_heads=args.num_heads
    )
    sigma = args.sigma if args.sigma is not None else meta.sigma
    if sigma is None:
        raise ValueError("this checkpoint records no training sigma: pass --sigma")
    validate(sigma, args.alpha, args.n, args.n0 if args.mode == "certify" else None)
    if args.batch < 1 or args.skip < 1:
        raise ValueError("--batch and --skip must be at least 1")
    device = pick_device(args.device)
    model = model.to(device)
    sampler = BatchSampler(model, meta.num_classes, args.batch, device, autocast_dtype(device))
    inputs = open_inputs(args.input, meta.input_size)
    indices = list(range(0, len(inputs), args.skip))
    if args.max >= 0:
        indices = indices[: args.max]
    print(
        f"# {args.mode} {len(indices)} input(s) with {args.checkpoint} on {device}: "
        f"sigma={sigma:g} n0={args.n0} n={args.n} alpha={args.alpha:g}; radius in L2 over "
        f"(3, {meta.input_size}, {meta.input_size}) {SPACE}",
        file=sys.stderr,
    )

    rows: list[Row] = []
    show = not args.no_progress
    per_sample = len(indices) == 1
    bar = tqdm(
        total=(args.n0 + args.n) if per_sample else len(indices),
        disable=not show,
        unit="sample" if per_sample else "img",
        file=sys.stderr,
        dynamic_ncols=True,
    )
    for i in indices:
        x, label, name = inputs[i]
        started = time.perf_counter()
        progress = bar.update if per_sample else None
        if args.mode == "certify":
            cert = certify(
                sampler,
                x,
                sigma,
                args.n0,
                args.n,
                args.alpha,
                args.seed + i,
                top2=args.top2,
                progress=progress,
            )
        else:
            cert = predict(sampler, x, sigma, args.n, args.alpha, args.seed + i, progress=progress)
        row = Row(
            idx=i,
            label=label,
            predict=-1 if cert.prediction is None else cert.prediction,
            radius=cert.radius,
            time=time.perf_counter() - started,
            count_a=cert.count_a,
            n=cert.n,
            pa_lower=cert.pa_lower,
            n0=cert.n0,
            sigma=sigma,
            alpha=args.alpha,
            max_radius=cert.max_radius,
            name=name,
        )
        rows.append(row)
        if not per_sample:
            bar.update(1)
        if per_sample or not show:
            outcome = (
                f"abstain ({cert.abstain_reason})"
                if cert.abstained
                else f"{meta.class_name(cert.prediction)} radius={cert.radius:.4f}"
            )
            tqdm.write(f"{name}: {outcome}", file=sys.stderr)
    bar.close()

    if args.out:
        write_tsv(args.out, rows)
    labelled = any(r.label >= 0 for r in rows)
    radii = default_radii(max_radius(sigma, args.n, args.alpha))
    values = (certified_accuracy if labelled else certified_fraction)(rows, radii)
    what = "certified accuracy" if labelled else "fraction certified (no labels)"
    if args.mode == "predict":
        radii, what = [0.0], "accuracy" if labelled else "fraction predicted (no labels)"
        values = values[:1]
    seconds = sum(r.time for r in rows)
    print(
        f"{what} over {len(rows)} input(s), {seconds:.1f} s "
        f"({seconds / max(len(rows), 1):.2f} s per input):"
    )
    print("radius\t" + "\t".join(f"{r:g}" for r in radii))
    print("value\t" + "\t".join(f"{v:.3f}" for v in values))
    if args.plot:
        plot_curve(args.plot, rows, f"{args.checkpoint} sigma={sigma:g} n={args.n}")
    return 0
