"""Stage 1: DMAE pre-training (Gaussian noise + 75% masking, clean norm-pix target, all patches).

Writes a project-format ``kind='pretrain'`` checkpoint (encoder + decoder) that
``dmae-certify train finetune --pretrained`` starts from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from models.checkpoints import CheckpointMeta
from models.networks import DenoisingMaskedAutoencoderViT, preset
from models.runtime import pick_device
from models.training.datasets import open_training_data, train_transform
from models.training.loop import (
    LogFn,
    LoopSettings,
    RunOptions,
    TrainingRun,
    resolve_amp,
    seed_everything,
    set_threads,
    training_record,
    write_checkpoint,
)
from models.training.schedule import adamw, param_groups, scaled_lr


@dataclass
class PretrainConfig(RunOptions):
    """``dmae-certify train pretrain`` settings; defaults are the published recipe's."""

    data: str
    out: Path
    arch: str = "base"
    input_size: int | None = None
    sigma: float = 0.25
    mask_ratio: float = 0.75
    epochs: int = 1100
    warmup_epochs: float = 40
    batch_size: int = 64
    accum_iter: int = 1
    blr: float = 1.5e-4
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    clip_grad: float | None = None
    augment: bool = True


def pretrain_step(
    model: nn.Module, x: Tensor, y: Tensor, noise: torch.Generator
) -> tuple[Tensor, dict[str, float]]:
    del y
    loss, _, _ = model(x, generator=noise)
    return loss, {}


def run_pretrain(
    cfg: PretrainConfig,
    *,
    log: LogFn = print,
    after_step: Callable[[int], None] | None = None,
) -> Path:
    """Pre-train (or resume) in ``cfg.out``; returns the written checkpoint's path."""
    if not 0 <= cfg.mask_ratio < 1:
        raise ValueError(f"--mask-ratio must lie in [0, 1), got {cfg.mask_ratio}")
    if cfg.sigma < 0:
        raise ValueError(f"--sigma must be non-negative, got {cfg.sigma}")
    set_threads(cfg.threads)
    device = pick_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    arch = preset(cfg.arch)
    augment = (lambda size, mean: train_transform(size, (0.2, 1.0), mean)) if cfg.augment else None
    data = open_training_data(
        cfg.data, cfg.input_size or (None if cfg.data.startswith("digits:") else arch.img_size),
        augment=augment, num_workers=cfg.num_workers,
    )  # fmt: skip
    mean, std = tuple(cfg.mean or data.mean), tuple(cfg.std or data.std)
    seed_everything(cfg.seed)
    model = DenoisingMaskedAutoencoderViT(
        arch, data.input_size, mean, std, sigma=cfg.sigma, mask_ratio=cfg.mask_ratio
    ).to(device)
    effective = cfg.batch_size * cfg.accum_iter
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, effective)
    optimizer = adamw(param_groups(model, cfg.weight_decay), lr)
    settings = LoopSettings(
        cfg.epochs, cfg.batch_size, cfg.accum_iter, lr, cfg.min_lr, cfg.warmup_epochs,
        cfg.clip_grad, cfg.seed, device, amp, cfg.save_every_steps, cfg.progress,
    )  # fmt: skip
    run = TrainingRun(
        Path(cfg.out), model, optimizer, settings, data, pretrain_step, cfg.recipe(), log=log
    )
    log(
        f"pre-training {cfg.arch} ({sum(p.numel() for p in model.parameters()):,} parameters) on "
        f"{data.spec} ({len(data)} images, {data.input_size}px) for {cfg.epochs} epochs x "
        f"{run.steps_per_epoch} steps; lr {lr:.3e} (effective batch {effective}); "
        f"device {device}, amp {amp or 'off'}"
    )
    run.run(resume=cfg.resume, after_step=after_step)
    meta = CheckpointMeta(
        kind="pretrain",
        arch=arch,
        input_size=data.input_size,
        mean=mean,
        std=std,
        classes=list(data.classes),
        sigma=cfg.sigma,
        name=cfg.name or Path(cfg.out).name,
        source="dmae-certify train pretrain",
        training=training_record("pretrain", cfg, lr, effective, run, data, device),
    )
    return write_checkpoint(cfg.out, cfg.export, model, meta, log)
