"""Stage 1: DMAE pre-training (Gaussian noise + 75% masking, clean norm-pix target, all patches).

With ``sigma = 0`` the model sees the clean image and this is MAE (He et al. 2022); MAE
computes its loss on the masked patches only, DMAE on all patches (``loss_on``). Writes a
project-format ``kind='pretrain'`` checkpoint (encoder + decoder) that
``dmae-certify train finetune --pretrained`` starts from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from models.checkpoints import CheckpointMeta
from models.data import built_in
from models.networks import LOSS_ON, SHAPE_FIELDS, ArchConfig, DenoisingMaskedAutoencoderViT, shaped
from models.training.datasets import open_training_data, train_transform
from models.training.distributed import World, barrier, training_world
from models.training.loop import (
    CHECKPOINT_FILE,
    LogFn,
    LoopSettings,
    RunOptions,
    TrainingRun,
    check_optimisation,
    describe_batch,
    resolve_amp,
    seed_everything,
    set_threads,
    training_record,
    write_checkpoint,
)
from models.training.recipes import RECIPE_FIELD, pretrain_recipe_name
from models.training.schedule import adamw, param_groups, scaled_lr


@dataclass
class PretrainConfig(RunOptions):
    """``dmae-certify train pretrain`` settings; defaults are the published recipe's."""

    data: str
    out: Path
    arch: str = "base"
    img_size: int | None = None  # shape beside the preset (None: the preset's): model resolution,
    patch_size: int | None = None  # patch side,
    embed_dim: int | None = None  # width,
    depth: int | None = None  # encoder blocks,
    num_heads: int | None = None  # attention heads
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
    loss_on: str = "all"  # "all" patches (DMAE) or "masked" ones only (MAE)

    @property
    def recipe_name(self) -> str:
        return pretrain_recipe_name(self.sigma, self.loss_on)

    def architecture(self) -> ArchConfig:
        """The preset with the shape options applied; ValueError naming a bad one."""
        return shaped(self.arch, **{k: getattr(self, k) for k in SHAPE_FIELDS})

    def check(self) -> None:
        """ValueError for settings no run can use (before any data is read)."""
        super().check()
        check_optimisation(self)
        self.architecture()
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"--mask-ratio must lie in [0, 1), got {self.mask_ratio}")
        if not self.sigma >= 0:
            raise ValueError(f"--sigma must be non-negative, got {self.sigma}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"--loss-on must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}")
        if self.loss_on == "masked" and self.mask_ratio == 0:
            raise ValueError("--loss-on masked needs masked patches: set --mask-ratio above 0")


def pretrain_step(
    model: nn.Module, x: Tensor, y: Tensor, noise: torch.Generator, *, loss_on: str = "all"
) -> tuple[Tensor, dict[str, float]]:
    del y
    loss, _, _ = model(x, generator=noise, loss_on=loss_on)
    return loss, {}


def run_pretrain(
    cfg: PretrainConfig,
    *,
    log: LogFn = print,
    after_step: Callable[[int], None] | None = None,
) -> Path:
    """Pre-train (or resume) in ``cfg.out``; returns the written checkpoint's path.

    Under torchrun every process runs this; rank 0 logs and writes the files.
    """
    cfg.check()
    set_threads(cfg.threads)
    with training_world(cfg.device) as (world, device):
        return _pretrain(cfg, world, device, log, after_step)


def _pretrain(
    cfg: PretrainConfig,
    world: World,
    device: torch.device,
    log: LogFn,
    after_step: Callable[[int], None] | None,
) -> Path:
    amp = resolve_amp(cfg.amp, device)
    arch = cfg.architecture()
    augment = (lambda size, mean: train_transform(size, (0.2, 1.0), mean)) if cfg.augment else None
    data = open_training_data(
        cfg.data, cfg.input_size or (None if built_in(cfg.data) else arch.img_size),
        augment=augment, num_workers=cfg.num_workers,
    )  # fmt: skip
    mean, std = tuple(cfg.mean or data.mean), tuple(cfg.std or data.std)
    seed_everything(cfg.seed)
    model = DenoisingMaskedAutoencoderViT(
        arch, data.input_size, mean, std, sigma=cfg.sigma, mask_ratio=cfg.mask_ratio
    ).to(device)
    effective = world.size * cfg.batch_size * cfg.accum_iter
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, effective)
    optimizer = adamw(param_groups(model, cfg.weight_decay), lr)
    settings = LoopSettings(
        cfg.epochs, cfg.batch_size, cfg.accum_iter, lr, cfg.min_lr, cfg.warmup_epochs,
        cfg.clip_grad, cfg.seed, device, amp, cfg.save_every_steps, cfg.progress,
    )  # fmt: skip
    step = partial(pretrain_step, loss_on=cfg.loss_on)
    run = TrainingRun(
        Path(cfg.out), model, optimizer, settings, data, step, cfg.recipe(), log=log, world=world
    )
    run.log(
        f"pre-training {cfg.arch} {_shape(arch)} "
        f"({sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{cfg.recipe_name}: sigma {cfg.sigma:g}, loss on {cfg.loss_on} patches) on "
        f"{data.spec} ({len(data)} images, {data.input_size}px) for {cfg.epochs} epochs x "
        f"{run.steps_per_epoch} steps; lr {lr:.3e} ({describe_batch(effective, world)}); "
        f"device {device}, amp {amp or 'off'}"
    )
    run.run(resume=cfg.resume, after_step=after_step)
    if not world.main:
        barrier(world)  # wait for rank 0's checkpoint
        return Path(cfg.export) if cfg.export else Path(cfg.out) / CHECKPOINT_FILE
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
        training=training_record(
            "pretrain", cfg, lr, run, data, device, **{RECIPE_FIELD: cfg.recipe_name}
        ),
    )
    path = write_checkpoint(cfg.out, cfg.export, model, meta, log)
    barrier(world)
    return path


def _shape(arch: ArchConfig) -> str:
    return (
        f"[{arch.img_size}px, patch {arch.patch_size}, width {arch.embed_dim}, "
        f"depth {arch.depth}, {arch.num_heads} heads]"
    )
