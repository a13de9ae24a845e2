"""Stage 2: fine-tune a smoothing classifier on Gaussian-noised inputs with consistency loss.

The classifier (:class:`models.networks.DMAEClassifier`) starts from a pre-trained encoder: a
project-format checkpoint, or an official DMAE file read by :mod:`models.checkpoints`; or, with
``pretrained='none'``, from a random encoder of the preset ``arch`` (the baselines: with
``copies=1, lbd=0, eta=0`` the loss is plain cross-entropy on Gaussian-noised inputs, Cohen et
al. 2019's training). Each
epoch ends with an evaluation on the held-out split: clean and noisy accuracy (one seeded
noise draw per image) and the smoothed classifier's radius-0 accuracy (PREDICT of
:mod:`models.smoothing` on a subset). The result is a project-format classifier checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.checkpoints import (
    OFFICIAL_LICENCE,
    CheckpointError,
    CheckpointMeta,
    file_sha256,
    load_model,
    resolve,
)
from models.data import built_in
from models.networks import (
    SHAPE_FIELDS,
    ArchConfig,
    DenoisingMaskedAutoencoderViT,
    DMAEClassifier,
    encoder_state,
    shaped,
)
from models.smoothing import BatchSampler, predict
from models.training.consistency import DEFAULT_LAMBDA, consistency_loss, default_eta
from models.training.datasets import (
    ImageTransform,
    TrainData,
    open_training_data,
    seeded,
    split_off,
    train_transform,
)
from models.training.distributed import World, barrier, training_world
from models.training.loop import (
    CHECKPOINT_FILE,
    LogFn,
    LoopSettings,
    RunOptions,
    StepFn,
    TrainingRun,
    check_optimisation,
    describe_batch,
    resolve_amp,
    seed_everything,
    set_threads,
    training_record,
    write_checkpoint,
)
from models.training.recipes import (
    OFFICIAL,
    RECIPE_FIELD,
    SCRATCH,
    UNKNOWN,
    finetune_method,
    recipe_name_of,
)
from models.training.schedule import adamw, param_groups, scaled_lr

HEAD_KEYS = frozenset({"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"})
NO_PRETRAINING = "none"  # --pretrained none: a randomly initialised encoder of --arch
SCRATCH_ARCH = "base"
# (images, labels) -> (mixed images, soft targets), as timm.data.Mixup
MixupFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass
class FinetuneConfig(RunOptions):
    """``dmae-certify train finetune`` settings; defaults follow the published ViT-B recipe."""

    data: str
    out: Path
    pretrained: str
    sigma: float
    arch: str | None = None  # with pretrained="none" only (default "base")
    img_size: int | None = None  # shape beside the preset, with pretrained="none" only
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    val_data: str | None = None
    val_fraction: float = 0.1
    input_size: int | None = None
    num_heads: int | None = None  # pretrained="none": the encoder's; official files: theirs
    epochs: int = 100
    warmup_epochs: float = 5
    batch_size: int = 64
    accum_iter: int = 1
    blr: float = 5e-4
    lr: float | None = None
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    drop_path: float = 0.1
    clip_grad: float | None = None
    label_smoothing: float = 0.1
    copies: int = 2
    lbd: float = DEFAULT_LAMBDA
    eta: float | None = None  # default: 0.5 for sigma <= 0.5, else 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    augment: bool = True
    randaug: str | None = None
    eval_images: int = 100
    eval_n: int = 100
    eval_alpha: float = 0.001
    eval_batch: int = 1000
    eval_every: int = 1

    @property
    def eta_value(self) -> float:
        return default_eta(self.sigma) if self.eta is None else self.eta

    @property
    def scratch(self) -> bool:
        return self.pretrained.strip().lower() == NO_PRETRAINING

    @property
    def method(self) -> str:
        """``consistency`` or ``gaussian`` (plain cross-entropy on noisy copies)."""
        return finetune_method(self.copies, self.lbd, self.eta_value)

    def recipe(self) -> dict[str, Any]:
        return {**super().recipe(), "eta": self.eta_value}

    def architecture(self) -> ArchConfig:
        """With ``pretrained='none'``: the preset with the shape options applied."""
        return shaped(self.arch or SCRATCH_ARCH, **{k: getattr(self, k) for k in SHAPE_FIELDS})

    def check(self) -> None:
        """ValueError for settings no run can use (before any file is read)."""
        super().check()
        check_optimisation(self)
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"--sigma must be positive, got {self.sigma}")
        if not self.scratch:
            for name in ("arch", *SHAPE_FIELDS[:-1]):
                if getattr(self, name) is not None:
                    flag = "--" + name.replace("_", "-")
                    raise ValueError(
                        f"{flag} applies to --pretrained none only: a pre-trained encoder "
                        "brings its own shape"
                    )
        else:
            self.architecture()  # ValueError naming the presets or a bad shape
        if self.copies < 1:
            raise ValueError(f"--copies must be at least 1, got {self.copies}")
        for name in ("lbd", "eta", "drop_path", "mixup", "cutmix"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be non-negative, got {value}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"--label-smoothing must lie in [0, 1), got {self.label_smoothing}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"--layer-decay must lie in (0, 1], got {self.layer_decay}")
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"--drop-path must lie in [0, 1), got {self.drop_path}")
        for name in ("mixup_prob", "mixup_switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must lie in [0, 1], got {getattr(self, name)}")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError("mixup/cutmix need an even --batch-size")
        if self.val_data is None and not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must lie in (0, 1), got {self.val_fraction}")
        if self.eval_n < 1 or self.eval_batch < 1 or self.eval_images < 0:
            raise ValueError("--eval-n and --eval-batch must be at least 1, --eval-images >= 0")
        from models.smoothing import Mode, check_n, validate_alpha

        validate_alpha(self.eval_alpha, "--eval-alpha")
        if self.eval_images:  # PREDICT below its minimum n would only ever abstain
            check_n(Mode.PREDICT, self.eval_n, self.eval_alpha)


@dataclass
class Pretrained:
    """The encoder a fine-tuning run starts from, and where it came from."""

    state: dict[str, Tensor]
    meta: CheckpointMeta
    official: bool
    record: dict[str, Any]
    scratch: bool = False

    @property
    def recipe_name(self) -> str:
        """The INIT part of the fine-tuned model's recipe name (see :mod:`.recipes`)."""
        if self.scratch:
            return SCRATCH
        if self.official:
            return OFFICIAL
        return recipe_name_of(self.meta.training) or UNKNOWN


def load_pretrained(cfg: FinetuneConfig) -> Pretrained:
    """Encoder weights from a project checkpoint (any kind) or an official DMAE file."""
    path = resolve(cfg.pretrained)
    official_kw: dict[str, Any] = {"num_heads": cfg.num_heads}
    if cfg.input_size:
        official_kw["input_size"] = cfg.input_size
    model, meta = load_model(path, **official_kw)
    state = encoder_state(model.state_dict())
    if not state:
        raise CheckpointError(f"{path}: holds no encoder weights")
    official = meta.licence == OFFICIAL_LICENCE
    record = {
        "file": path.name,
        "sha256": file_sha256(path),
        "kind": meta.kind,
        "source": meta.source,
        "official": official,
        "training": meta.training if not official else {},
    }
    pre = Pretrained(state, meta, official, record)
    record[RECIPE_FIELD] = pre.recipe_name
    return pre


def random_encoder(
    arch_name: str, input_size: int, seed: int, arch: ArchConfig | None = None
) -> Pretrained:
    """A random encoder for ``--pretrained none``: exactly the one pre-training with ``seed``
    would start from (the DMAE model's initialisation: xavier-uniform linear layers,
    cls token N(0, 0.02), fixed sin-cos positions), so the from-scratch baseline differs
    from the pre-trained recipe only by the pre-training. ``arch``: preset ``arch_name``
    with shape options applied (default: the preset itself)."""
    arch = arch or shaped(arch_name)
    with seeded(seed):
        model = DenoisingMaskedAutoencoderViT(arch, input_size)
    meta = CheckpointMeta(
        kind="pretrain", arch=arch, input_size=input_size, source="random initialisation"
    )
    record = {
        "kind": NO_PRETRAINING,
        "arch": arch_name,
        "shape": arch.to_dict(),
        "init": f"random (the DMAE pre-training model's initialisation, seed {seed})",
        RECIPE_FIELD: SCRATCH,
    }
    return Pretrained(encoder_state(model.state_dict()), meta, False, record, scratch=True)


def build_classifier(
    pre: Pretrained,
    num_classes: int,
    input_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    drop_path: float,
) -> DMAEClassifier:
    """A classifier whose encoder is ``pre``'s; fc_norm fresh, head initialised near zero."""
    model = DMAEClassifier(pre.meta.arch, num_classes, input_size, mean, std, drop_path)
    missing, unexpected = model.load_state_dict(pre.state, strict=False)
    if unexpected or set(missing) - HEAD_KEYS:
        raise CheckpointError(
            f"pre-trained encoder does not fit the classifier (missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)})"
        )
    head = model.head
    assert isinstance(head, nn.Linear)
    nn.init.trunc_normal_(head.weight, std=2e-5)
    nn.init.zeros_(head.bias)
    return model


def noisy_copies(x: Tensor, copies: int, sigma: float, noise: torch.Generator) -> Tensor:
    """(B, ...) -> (copies * B, ...): copy i is rows i*B .. (i+1)*B - 1, each freshly noised."""
    xs = x.float().repeat(copies, *([1] * (x.ndim - 1)))
    return xs + sigma * torch.randn(xs.shape, generator=noise, device=xs.device)


def make_step(cfg: FinetuneConfig, num_classes: int) -> StepFn:
    """The training step: noisy copies, consistency loss (with mixup/cutmix if set)."""
    mixup: MixupFn | None = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data.mixup import Mixup

        make_mixup: Callable[..., MixupFn] = Mixup  # timm's class is unannotated
        mixup = make_mixup(
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing,
            num_classes=num_classes,
        )  # fmt: skip
    eta = cfg.eta_value

    def step(
        model: nn.Module, x: Tensor, y: Tensor, noise: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        target: Tensor = y
        if mixup is not None:
            x, target = mixup(x, y)  # soft targets, label smoothing included
        b = x.shape[0]
        logits = model(noisy_copies(x, cfg.copies, cfg.sigma, noise)).view(cfg.copies, b, -1)
        smoothing = 0.0 if mixup is not None else cfg.label_smoothing
        res = consistency_loss(logits, target, cfg.lbd, eta, smoothing)
        acc = float((logits.detach().argmax(-1) == y.unsqueeze(0)).float().mean())
        return res.total, {"ce": res.ce, "kl": res.kl, "entropy": res.entropy, "train_acc": acc}

    return step


def make_evaluate(
    cfg: FinetuneConfig,
    val: TrainData,
    num_classes: int,
    device: torch.device,
    amp: torch.dtype | None,
) -> Callable[[nn.Module], dict[str, float]]:
    """Clean / noisy accuracy on ``val`` and smoothed radius-0 accuracy on its first images."""

    @torch.inference_mode()
    def evaluate(model: nn.Module) -> dict[str, float]:
        model.eval()
        noise = torch.Generator(device=device).manual_seed(cfg.seed + 2)
        clean = noisy = total = 0
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            for x, y in val.in_order(cfg.eval_batch):
                x, y = x.to(device), y.to(device)
                clean += int((model(x).argmax(1) == y).sum())
                xn = x + cfg.sigma * torch.randn(x.shape, generator=noise, device=device)
                noisy += int((model(xn).argmax(1) == y).sum())
                total += int(y.shape[0])
        out = {"clean_acc": clean / total, "noisy_acc": noisy / total}
        if cfg.eval_images > 0:
            sampler = BatchSampler(model, num_classes, cfg.eval_batch, device, amp)
            hits = seen = 0
            for x, y in val.in_order(1, limit=cfg.eval_images):
                cert = predict(sampler, x[0], cfg.sigma, cfg.eval_n, cfg.eval_alpha, seed=seen)
                hits += int(cert.prediction == int(y[0]))
                seen += 1
            out["smoothed_acc"] = hits / max(seen, 1)
        return out

    return evaluate


def run_finetune(
    cfg: FinetuneConfig,
    *,
    log: LogFn = print,
    after_step: Callable[[int], None] | None = None,
) -> Path:
    """Fine-tune (or resume) in ``cfg.out``; returns the written classifier checkpoint's path.

    Under torchrun every process runs this; rank 0 logs, evaluates and writes the files.
    """
    cfg.check()
    if cfg.randaug and not cfg.augment:
        raise ValueError("--randaug needs augmentation on (drop --no-augment)")
    set_threads(cfg.threads)
    with training_world(cfg.device) as (world, device):
        return _finetune(cfg, world, device, log, after_step)


def _finetune(
    cfg: FinetuneConfig,
    world: World,
    device: torch.device,
    log: LogFn,
    after_step: Callable[[int], None] | None,
) -> Path:
    amp = resolve_amp(cfg.amp, device)
    pre, data, val = _open_data(cfg)
    input_size = data.input_size
    if pre.official or pre.scratch:
        mean, std = tuple(cfg.mean or data.mean), tuple(cfg.std or data.std)
    else:
        mean, std = tuple(cfg.mean or pre.meta.mean), tuple(cfg.std or pre.meta.std)
    num_classes = len(data.classes)
    seed_everything(cfg.seed)
    model = build_classifier(pre, num_classes, input_size, mean, std, cfg.drop_path).to(device)
    effective = world.size * cfg.batch_size * cfg.accum_iter
    lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, effective)
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay, pre.meta.arch.depth)
    optimizer = adamw(groups, lr)
    settings = LoopSettings(
        cfg.epochs, cfg.batch_size, cfg.accum_iter, lr, cfg.min_lr, cfg.warmup_epochs,
        cfg.clip_grad, cfg.seed, device, amp, cfg.save_every_steps, cfg.progress, cfg.eval_every,
    )  # fmt: skip
    run = TrainingRun(
        Path(cfg.out), model, optimizer, settings, data, make_step(cfg, num_classes),
        cfg.recipe(), evaluate=make_evaluate(cfg, val, num_classes, device, amp), log=log,
        world=world,
    )  # fmt: skip
    recipe_name = f"{pre.recipe_name}+{cfg.method}"
    start = f"a random {cfg.arch or SCRATCH_ARCH} encoder" if pre.scratch else pre.record["file"]
    run.log(
        f"fine-tuning ({recipe_name}) at sigma {cfg.sigma} from {start} on {data.spec} "
        f"({len(data)} images, {num_classes} classes, {input_size}px; held out: {val.spec}, "
        f"{len(val)}) for {cfg.epochs} epochs x {run.steps_per_epoch} steps; lr {lr:.3e} "
        f"({describe_batch(effective, world)}); device {device}, amp {amp or 'off'}"
    )
    run.run(resume=cfg.resume, after_step=after_step)
    if not world.main:
        barrier(world)  # wait for rank 0's checkpoint
        return Path(cfg.export) if cfg.export else Path(cfg.out) / CHECKPOINT_FILE
    training = training_record(
        "finetune",
        cfg,
        lr,
        run,
        data,
        device,
        held_out=val.describe(),
        final_epoch={k: v for k, v in run.last_record().items() if isinstance(v, int | float)},
        pretrained=pre.record,
        **{RECIPE_FIELD: recipe_name},
    )
    meta = _classifier_meta(cfg, pre, data, (mean, std), training)
    path = write_checkpoint(cfg.out, cfg.export, model, meta, log)
    barrier(world)
    return path


def _open_data(cfg: FinetuneConfig) -> tuple[Pretrained, TrainData, TrainData]:
    """The encoder to start from, the training data and the held-out data, in this order
    (the random encoder of ``--pretrained none`` needs the data's input size)."""
    if cfg.scratch:
        model_size = cfg.architecture().img_size
        input_size = cfg.input_size or (None if built_in(cfg.data) else model_size)
    else:
        pre = load_pretrained(cfg)
        input_size = cfg.input_size or pre.meta.input_size
    augment = None
    if cfg.augment:

        def augment(size: int, mean: tuple[float, ...]) -> ImageTransform:
            return train_transform(size, (0.08, 1.0), mean, cfg.randaug)

    data = open_training_data(cfg.data, input_size, augment=augment, num_workers=cfg.num_workers)
    input_size = data.input_size
    if cfg.scratch:
        pre = random_encoder(cfg.arch or SCRATCH_ARCH, input_size, cfg.seed, cfg.architecture())
    if cfg.val_data:
        val = open_training_data(cfg.val_data, input_size, num_workers=cfg.num_workers)
        if val.classes != data.classes:
            raise ValueError(f"{cfg.val_data}: classes differ from the training data's")
    else:
        data, val = split_off(data, cfg.val_fraction, cfg.seed)
    return pre, data, val


def _classifier_meta(
    cfg: FinetuneConfig,
    pre: Pretrained,
    data: TrainData,
    normalisation: tuple[tuple[float, ...], tuple[float, ...]],
    training: dict[str, Any],
) -> CheckpointMeta:
    """What the fine-tuned classifier's checkpoint records (``normalisation``: mean, std)."""
    mean, std = normalisation
    return CheckpointMeta(
        kind="classifier",
        arch=pre.meta.arch,
        input_size=data.input_size,
        mean=mean,
        std=std,
        num_classes=len(data.classes),
        classes=list(data.classes),
        sigma=cfg.sigma,
        name=cfg.name or Path(cfg.out).name,
        source="dmae-certify train finetune",
        licence=OFFICIAL_LICENCE if pre.official else "",
        training=training,
    )
