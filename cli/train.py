"""``dmae-certify train pretrain`` and ``dmae-certify train finetune``: the DMAE training stages."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any

AMP_CHOICES = ("auto", "bf16", "fp16", "off")  # as models.training.loop.AMP_CHOICES


def _triple(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {text!r}")
    return (values[0], values[1], values[2])


def _run_options(p: argparse.ArgumentParser) -> None:
    """Options both stages share: data, output, optimisation, device and resume."""
    p.add_argument("--data", required=True, help="digits:train, mnist:train or an ImageFolder root")
    p.add_argument("--out", required=True, type=Path, help="run directory (state, log, checkpoint)")
    p.add_argument("--export", type=Path, default=None, help="also write the checkpoint here")
    p.add_argument("--name", default=None, help="model name stored in the checkpoint")
    p.add_argument(
        "--input-size", type=int, default=None, help="native image size (digits: 8, mnist: 28)"
    )
    p.add_argument("--mean", type=_triple, default=None, help="R,G,B mean (default: the data's)")
    p.add_argument("--std", type=_triple, default=None, help="R,G,B std (default: the data's)")
    p.add_argument("--batch-size", type=int, default=64, help="images per micro-batch")
    p.add_argument("--accum-iter", type=int, default=1, help="micro-batches per optimiser step")
    p.add_argument("--lr", type=float, default=None, help="absolute peak lr (overrides --blr)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip-grad", type=float, default=None, help="max gradient L2 norm")
    p.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="no random crop/flip on ImageFolder data (digits never are)",
    )
    p.add_argument("--num-workers", type=int, default=4, help="image loading processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        default="auto",
        help="mixed precision on CUDA (auto: bf16 where supported)",
    )
    p.add_argument(
        "--save-every-steps",
        type=int,
        default=0,
        help="also save the resume state every N steps (always: every epoch)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: torch's choice)"
    )
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _shape_options(p: argparse.ArgumentParser, heads: bool = True) -> None:
    """The encoder shape beside the preset (--arch); each defaults to the preset's value."""
    g = p.add_argument_group(
        "shape",
        "the encoder's shape beside the preset --arch (default: the preset's); recorded in the "
        "checkpoint. E.g. 28x28 MNIST at its own size: --arch tiny --img-size 28 --patch-size 4",
    )
    g.add_argument("--img-size", type=int, default=None, help="model resolution (pixels)")
    g.add_argument("--patch-size", type=int, default=None, help="patch side (divides --img-size)")
    g.add_argument("--embed-dim", type=int, default=None, help="width (a multiple of 4)")
    g.add_argument("--depth", type=int, default=None, help="transformer blocks")
    if heads:
        g.add_argument("--num-heads", type=int, default=None, help="heads (divide the width)")


def register(sub: Any) -> None:
    train = sub.add_parser("train", help="pre-train a DMAE or fine-tune a smoothing classifier")
    stages = train.add_subparsers(dest="stage", required=True, metavar="STAGE")
    _add_pretrain(stages)
    _add_finetune(stages)
    _add_compare(stages)
    _add_ablation(stages)


def _add_pretrain(stages: Any) -> None:
    """``train pretrain``: run options, preset and shape, noise/masking, schedule."""
    pre = stages.add_parser(
        "pretrain",
        help="DMAE pre-training: noise + masking, clean target over all patches "
        "(--sigma 0 --loss-on masked: MAE)",
        description="DMAE pre-training (Wu et al. 2023): reconstruct the clean image from a "
        "Gaussian-noised, masked copy. --sigma 0 feeds the clean image: that is MAE (He et al. "
        "2022) except for the loss, which DMAE takes over all patches and MAE over the masked "
        "ones only; add --loss-on masked for the published MAE.",
    )
    _run_options(pre)
    pre.add_argument("--arch", default="base", help="architecture preset (default %(default)s)")
    _shape_options(pre)
    pre.add_argument(
        "--sigma",
        type=float,
        default=0.25,
        help="pre-training noise level (default %(default)s; 0: no noise, MAE)",
    )
    pre.add_argument("--mask-ratio", type=float, default=0.75)
    pre.add_argument(
        "--loss-on",
        choices=("all", "masked"),
        default="all",
        help="reconstruction loss over all patches (DMAE, default) or the masked ones (MAE)",
    )
    pre.add_argument("--epochs", type=int, default=1100)
    pre.add_argument("--warmup-epochs", type=float, default=40)
    pre.add_argument("--blr", type=float, default=1.5e-4, help="base lr (x batch/256)")
    pre.add_argument("--min-lr", type=float, default=0.0)
    pre.set_defaults(func=run_pretrain)


def _add_finetune(stages: Any) -> None:
    """``train finetune``: run options, encoder, schedule, loss, augmentation, evaluation."""
    ft = stages.add_parser(
        "finetune",
        help="fine-tune a classifier under Gaussian noise with consistency loss",
        description="Train a smoothing classifier under Gaussian noise. From a pre-trained "
        "encoder (--pretrained FILE) or a random one (--pretrained none --arch PRESET); with "
        "--copies 1 --lbd 0 --eta 0 --label-smoothing 0 the loss is plain cross-entropy on "
        "noisy inputs, Cohen et al. (2019)'s Gaussian augmentation.",
    )
    _run_options(ft)
    _finetune_encoder_options(ft)
    _finetune_schedule_options(ft)
    _finetune_loss_options(ft)
    _finetune_augment_options(ft)
    _finetune_eval_options(ft)
    ft.set_defaults(func=run_finetune)


def _finetune_encoder_options(ft: argparse.ArgumentParser) -> None:
    """The encoder to start from, its shape, the noise level and the held-out data."""
    ft.add_argument(
        "--pretrained",
        required=True,
        help="pre-trained encoder: project checkpoint or official DMAE .pth; 'none' for a "
        "randomly initialised encoder of --arch (training from scratch)",
    )
    ft.add_argument(
        "--arch",
        default=None,
        help="architecture preset with --pretrained none (default base)",
    )
    _shape_options(ft, heads=False)
    ft.add_argument("--sigma", type=float, required=True, help="training noise level")
    ft.add_argument(
        "--val-data", default=None, help="held-out set (default: --val-fraction of --data)"
    )
    ft.add_argument("--val-fraction", type=float, default=0.1)
    ft.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="attention heads: of the --pretrained none encoder, or of an official file",
    )


def _finetune_schedule_options(ft: argparse.ArgumentParser) -> None:
    """Epochs, learning-rate schedule and regularisation."""
    ft.add_argument("--epochs", type=int, default=100)
    ft.add_argument("--warmup-epochs", type=float, default=5)
    ft.add_argument("--blr", type=float, default=5e-4, help="base lr (x batch/256)")
    ft.add_argument("--min-lr", type=float, default=1e-6)
    ft.add_argument("--layer-decay", type=float, default=0.65)
    ft.add_argument("--drop-path", type=float, default=0.1)


def _finetune_loss_options(ft: argparse.ArgumentParser) -> None:
    """The consistency loss: label smoothing, noisy copies, KL and entropy weights."""
    ft.add_argument("--label-smoothing", type=float, default=0.1)
    ft.add_argument("--copies", type=int, default=2, help="noisy copies per image (m)")
    ft.add_argument("--lbd", type=float, default=2.0, help="consistency KL weight (lambda)")
    ft.add_argument(
        "--eta",
        type=float,
        default=None,
        help="entropy weight (default 0.5 for sigma <= 0.5, else 0.1)",
    )


def _finetune_augment_options(ft: argparse.ArgumentParser) -> None:
    """Mixup, cutmix and RandAugment."""
    ft.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    ft.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    ft.add_argument("--mixup-prob", type=float, default=1.0)
    ft.add_argument("--mixup-switch-prob", type=float, default=0.5)
    ft.add_argument(
        "--randaug",
        default=None,
        help="timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1 (ImageFolder)",
    )


def _finetune_eval_options(ft: argparse.ArgumentParser) -> None:
    """The smoothed accuracy on held-out images after each (or every N-th) epoch."""
    ft.add_argument(
        "--eval-images",
        type=int,
        default=100,
        help="held-out images for the smoothed accuracy each epoch",
    )
    ft.add_argument("--eval-n", type=int, default=100, help="PREDICT samples per image")
    ft.add_argument("--eval-alpha", type=float, default=0.001)
    ft.add_argument("--eval-batch", type=int, default=1000)
    ft.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and last)")


def _add_compare(stages: Any) -> None:
    """``train compare``: a reproduced checkpoint against a reference one."""
    cmp = stages.add_parser(
        "compare",
        help="compare a reproduced checkpoint with a reference one (recipe, weights, metrics)",
        description="Compare the checkpoint a reproduction wrote (e.g. "
        "runs/digits-s0.25/checkpoint.safetensors) with the reference (a file or a bundled "
        "model's name, e.g. digits-s0.25): the recipes each records, including the pre-trained "
        "encoder's; the weights' sha256 (identical on the same machine and thread count, "
        "else expect floating-point differences); and the final-epoch metrics side by side. "
        "Exit 0 when the recipes agree, 1 when they differ.",
    )
    cmp.add_argument("reproduced", help="the checkpoint the reproduction wrote")
    cmp.add_argument("reference", help="the reference checkpoint: a file or a bundled name")
    cmp.set_defaults(func=run_compare)


def _add_ablation(stages: Any) -> None:
    """``train ablation``: its options live in cli.ablation."""
    from cli import ablation

    abl = stages.add_parser(
        "ablation",
        help="the DMAE paper's ablation on digits: DMAE vs MAE vs no pre-training vs Cohen",
        description=(ablation.__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ablation.add_arguments(abl)
    abl.set_defaults(func=run_ablation)


COMMAND_SKIP = ("progress", "resume", "command")


def canonical_command(stage: str, cfg: Any) -> str:
    """The command line that reproduces ``cfg``: every setting that differs from its default."""
    words = ["dmae-certify", "train", stage]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in COMMAND_SKIP or f.default is dataclasses.MISSING and value is None:
            continue
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, tuple):
            words += [flag, ",".join(f"{v:g}" for v in value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)


def _config(args: argparse.Namespace, cls: Any, stage: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: v for k, v in vars(args).items() if k in names})
    cfg.command = canonical_command(stage, cfg)
    return cfg


def _failed(exc: Exception, stage: str) -> int:
    print(f"dmae-certify train {stage}: error: {exc}", file=sys.stderr)
    return 1


def run_pretrain(args: argparse.Namespace) -> int:
    from models.training.loop import TrainingError
    from models.training.pretrain import PretrainConfig
    from models.training.pretrain import run_pretrain as run

    try:
        run(_config(args, PretrainConfig, "pretrain"))
    except TrainingError as exc:
        return _failed(exc, "pretrain")
    return 0


def run_finetune(args: argparse.Namespace) -> int:
    from models.training.finetune import FinetuneConfig
    from models.training.finetune import run_finetune as run
    from models.training.loop import TrainingError

    try:
        run(_config(args, FinetuneConfig, "finetune"))
    except TrainingError as exc:
        return _failed(exc, "finetune")
    return 0


def run_ablation(args: argparse.Namespace) -> int:
    from cli.ablation import run

    return run(args)


# Recipe entries that name a file rather than a setting: the pre-trained encoder is compared
# by its own recorded recipe instead of its path.
RECIPE_PATHS = ("pretrained",)
FINAL_METRICS = ("clean_acc", "noisy_acc", "smoothed_acc", "train_acc", "loss")


def stage_defaults(stage: str) -> dict[str, Any]:
    """The default of each setting of ``stage`` (``pretrain`` or ``finetune``), as recorded."""
    from models.training.finetune import FinetuneConfig
    from models.training.pretrain import PretrainConfig

    cls = PretrainConfig if stage == "pretrain" else FinetuneConfig
    return {
        f.name: list(f.default) if isinstance(f.default, tuple) else f.default
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING
    }


def recipe_differences(got: dict[str, Any], want: dict[str, Any], stage: str) -> list[str]:
    """``name: got vs want`` for each recipe setting that differs (file paths aside). A setting
    one record lacks (recorded before it existed) counts as its default."""
    defaults = stage_defaults(stage)
    out = []
    for name in sorted((set(got) | set(want)) - set(RECIPE_PATHS)):
        a, b = got.get(name, defaults.get(name)), want.get(name, defaults.get(name))
        if a != b:
            out.append(f"{name}: {a!r} vs {b!r}")
    return out


def run_compare(args: argparse.Namespace) -> int:
    from models.checkpoints import read_meta, resolve

    metas = [read_meta(resolve(p)) for p in (args.reproduced, args.reference)]
    got, want = (m.training or {} for m in metas)
    if not got.get("recipe") or not want.get("recipe"):
        raise ValueError("both checkpoints must record a training recipe (dmae-certify train)")
    stage = str(want.get("stage", "finetune"))
    diffs = recipe_differences(got["recipe"], want["recipe"], stage)
    pre = [
        (got.get("pretrained") or {}).get("training"),
        (want.get("pretrained") or {}).get("training"),
    ]
    if pre[0] and pre[1]:
        diffs += [
            f"pre-training {d}"
            for d in recipe_differences(pre[0]["recipe"], pre[1]["recipe"], "pretrain")
        ]
    print("recipe: the same" if not diffs else "recipe: differs in " + "; ".join(diffs))
    a, b = (m.weights_sha256 for m in metas)
    if a == b:
        print(f"weights: identical (sha256 {a})")
    else:
        print(
            f"weights: differ (sha256 {a[:16]}... vs {b[:16]}...): expected on another machine "
            "or thread count; compare the certified accuracy "
            "(dmae-certify certify --input digits:test --checkpoint FILE)"
        )
    finals = [t.get("final_epoch") or {} for t in (got, want)]
    for name in FINAL_METRICS:
        if name in finals[0] or name in finals[1]:
            x, y = (
                f"{v:.4f}" if isinstance(v, float) else "-"
                for v in (finals[0].get(name), finals[1].get(name))
            )
            print(f"final {name}: {x} (reproduced) vs {y} (reference)")
    return 0 if not diffs else 1
