"""The training loop both stages share: accumulation, mixed precision, schedule, resume, logs.

One optimiser step = ``accum_iter`` micro-batches of ``batch_size`` images in each of the
``world.size`` processes (see :mod:`.distributed`); the lr schedule is stepped per optimiser
step. Mixed precision (bf16 autocast, or fp16 with a GradScaler) is used on CUDA only. The run
directory holds ``state.pt`` (resume state, see :mod:`.state`) and ``log.jsonl`` (one JSON
object per epoch), written by rank 0 only.
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from models.checkpoints import CheckpointMeta, save_checkpoint
from models.training.datasets import Batch, TrainData, epoch_order
from models.training.distributed import (
    World,
    all_gather,
    all_sum,
    rank_seed,
    shard_micro_batches,
)
from models.training.schedule import WarmupCosine
from models.training.state import (
    STATE_FILE,
    capture_rng,
    config_differences,
    load_state,
    restore_rng,
    save_state,
)

StepFn = Callable[[nn.Module, Tensor, Tensor, torch.Generator], tuple[Tensor, dict[str, float]]]
EvalFn = Callable[[nn.Module], dict[str, float]]
LogFn = Callable[[str], None]
LOG_FILE = "log.jsonl"
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


class TrainingError(RuntimeError):
    """A run that cannot go on (diverged loss, unusable settings), with the reason."""


CHECKPOINT_FILE = "checkpoint.safetensors"
# Settings that do not change what a run computes (may differ when resuming).
RUN_ONLY = ("out", "resume", "num_workers", "progress", "export", "save_every_steps", "device",
            "command", "name", "eval_every", "threads")  # fmt: skip
# How the global batch is split over processes and micro-batches: a run may be resumed with
# another split of the same global batch (``effective_batch``), e.g. on another process count.
BATCH_SPLIT = ("batch_size", "accum_iter")


@dataclass(kw_only=True)
class RunOptions:
    """How a training run is executed and recorded (shared by both stages)."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    num_workers: int = 4
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    save_every_steps: int = 0
    threads: int | None = None
    progress: bool = True
    resume: bool = False
    name: str | None = None
    export: Path | None = None
    command: str | None = None

    def recipe(self) -> dict[str, Any]:
        """The settings that determine the result (recorded, and checked on resume)."""
        out = {k: v for k, v in asdict(self).items() if k not in RUN_ONLY}
        out["mean"] = list(self.mean) if self.mean else None
        out["std"] = list(self.std) if self.std else None
        return out

    def check(self) -> None:
        """ValueError naming a run option no run can use."""
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or not all(math.isfinite(v) for v in value)):
                raise ValueError(f"--{name} must be 3 finite numbers (R,G,B), got {value!r}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"--std must be positive, got {self.std!r}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.seed < 0 or self.save_every_steps < 0 or self.num_workers < 0:
            raise ValueError("--seed, --save-every-steps and --num-workers must be non-negative")


class OptimisationSettings(Protocol):
    """The optimisation fields both stages' configurations have."""

    epochs: int
    batch_size: int
    accum_iter: int
    warmup_epochs: float
    blr: float
    lr: float | None
    min_lr: float
    weight_decay: float
    clip_grad: float | None


def check_optimisation(cfg: OptimisationSettings) -> None:
    """ValueError for optimisation settings no run can use (both stages have these fields)."""
    for name in ("epochs", "batch_size", "accum_iter"):
        if getattr(cfg, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be at least 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.warmup_epochs <= cfg.epochs:
        raise ValueError(
            f"--warmup-epochs ({cfg.warmup_epochs:g}) must be within 0..--epochs ({cfg.epochs})"
        )
    positive = {"blr": cfg.blr, "lr": cfg.lr, "clip_grad": cfg.clip_grad}
    for name, value in positive.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    for name in ("min_lr", "weight_decay"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be non-negative, got {value}")


def describe_batch(effective: int, world: World) -> str:
    """``effective batch 256`` (one process) or ``... 256 = 4 processes x batch x accum``."""
    split = f" = {world.size} processes x batch x accum" if world.distributed else ""
    return f"effective batch {effective}{split}"


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def set_threads(threads: int | None) -> None:
    """CPU threads for this process (tiny models on shared CPUs often run fastest on one)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def resolve_amp(name: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on CUDA where supported, else fp16 on CUDA, and none on CPU."""
    if name == "off":
        return None
    if device.type != "cuda":
        if name == "auto":
            return None
        raise ValueError(f"mixed precision ({name}) is only used on CUDA; use --amp off on CPU")
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name in ("bf16", "fp16"):
        return torch.bfloat16 if name == "bf16" else torch.float16
    raise ValueError(f"--amp must be auto, bf16, fp16 or off, got {name!r}")


@dataclass
class LoopSettings:
    epochs: int
    batch_size: int
    accum_iter: int
    lr: float  # peak lr (already scaled by the effective batch)
    min_lr: float
    warmup_epochs: float
    clip_grad: float | None
    seed: int
    device: torch.device
    amp: torch.dtype | None
    save_every_steps: int = 0
    progress: bool = True
    eval_every: int = 1  # evaluate every N epochs and after the last


class TrainingRun:
    """Runs (or resumes) the epochs of one stage in ``out_dir``.

    ``model`` is the plain module (saved and evaluated); under torchrun (``world.size`` > 1)
    the training forward/backward goes through a DistributedDataParallel wrapper of it.
    """

    def __init__(
        self,
        out_dir: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        settings: LoopSettings,
        data: TrainData,
        step_fn: StepFn,
        config: dict[str, Any],
        evaluate: EvalFn | None = None,
        log: LogFn = print,
        world: World = World(),
    ):
        s = settings
        if s.epochs < 1 or s.batch_size < 1 or s.accum_iter < 1:
            raise ValueError("epochs, batch size and accumulation steps must be at least 1")
        if not 0 <= s.warmup_epochs <= s.epochs:
            raise ValueError(
                f"--warmup-epochs ({s.warmup_epochs:g}) must be within 0..--epochs ({s.epochs})"
            )
        self.world = world
        self.global_batch = world.size * s.batch_size * s.accum_iter
        self.steps_per_epoch = len(data) // self.global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{data.spec}: {len(data)} images do not fill one step of "
                f"{world.size} process(es) x {s.batch_size} x {s.accum_iter} images; "
                "lower --batch-size or --accum-iter"
            )
        self.out_dir = Path(out_dir)
        self.model = model
        self.train_model: nn.Module = model
        if world.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [s.device.index] if s.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(model, device_ids=ids)
        self.optimizer = optimizer
        self.s = settings
        self.data = data
        self.step_fn = step_fn
        self.config = {**config, "effective_batch": self.global_batch}
        self.evaluate = evaluate if world.main else None
        self.log = log if world.main else _quiet
        self.total_steps = s.epochs * self.steps_per_epoch
        self.schedule = WarmupCosine(
            optimizer, s.lr, round(s.warmup_epochs * self.steps_per_epoch), self.total_steps,
            s.min_lr,
        )  # fmt: skip
        self.scaler = torch.amp.GradScaler(s.device.type, enabled=s.amp == torch.float16)
        self.noise = torch.Generator(device=s.device)
        self.noise.manual_seed(rank_seed(s.seed, world.rank) + 1)
        if world.rank > 0:  # drop-path and mixup draws differ between ranks (rank 0: seed)
            seed_everything(rank_seed(s.seed, world.rank))
        self.epoch = 0
        self.step = 0
        self.lrs: list[float] = []  # lr of every optimiser step taken by this process

    @property
    def state_path(self) -> Path:
        return self.out_dir / STATE_FILE

    def last_record(self) -> dict[str, Any]:
        """The latest per-epoch record in the run's log (also after a resume)."""
        path = self.out_dir / LOG_FILE
        if not path.is_file():
            return {}
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        return dict(json.loads(lines[-1])) if lines else {}

    # ------------------------------------------------------------ state

    def state(self, rngs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "config": self.config,
            "epoch": self.epoch,
            "step": self.step,
            "world_size": self.world.size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs[0],
            "rng_ranks": rngs if self.world.distributed else [],
        }

    def save(self) -> None:
        """Rank 0 writes the state, with every rank's random states (a collective call)."""
        rngs = all_gather(capture_rng(self.noise, self.s.device), self.world)
        if self.world.main:
            save_state(self.state_path, self.state(rngs))

    def restore(self) -> None:
        state = load_state(self.state_path)
        diffs = config_differences(_comparable(state["config"]), _comparable(self.config))
        if diffs:
            raise ValueError(
                f"{self.state_path} was saved by a run with other settings; resuming would not "
                "continue it: " + "; ".join(diffs) + _batch_hint(diffs)
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        saved_world = int(state.get("world_size", 1))
        if saved_world == self.world.size:
            rngs = state["rng_ranks"] if self.world.distributed else [state["rng"]]
            restore_rng(rngs[self.world.rank], self.noise, self.s.device)
        else:
            # Data order, weights, optimiser and schedule continue exactly; the per-process
            # noise streams cannot, as there are now more or fewer of them: seed them afresh.
            seed = rank_seed(self.s.seed, self.world.rank, self.step)
            seed_everything(seed)
            self.noise.manual_seed(seed + 1)
            self.log(
                f"the run was saved by {saved_world} process(es) and resumes on "
                f"{self.world.size}: same global batch, data order and schedule; the noise "
                "streams are re-seeded (by seed, step and rank), so the result will not be "
                "bit-identical to an uninterrupted run"
            )

    # ------------------------------------------------------------ loop

    def run(
        self, resume: bool = False, after_step: Callable[[int], None] | None = None
    ) -> list[dict[str, Any]]:
        """Train to the last epoch; returns the per-epoch records (global figures)."""
        if resume:
            if not self.state_path.is_file():
                raise FileNotFoundError(f"nothing to resume: {self.state_path} does not exist")
            self.restore()
            self.log(f"resumed from {self.state_path} at epoch {self.epoch}, step {self.step}")
        elif self.state_path.exists():
            raise ValueError(
                f"{self.out_dir} already holds a run ({STATE_FILE}); pass --resume to continue "
                "it or choose another --out"
            )
        if self.world.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        records = []
        while self.epoch < self.s.epochs:
            records.append(self._epoch(after_step))
        return records

    def _epoch(self, after_step: Callable[[int], None] | None) -> dict[str, Any]:
        """Run the rest of the current epoch (all of it unless resumed mid-epoch)."""
        from tqdm import tqdm

        s, epoch = self.s, self.epoch
        keys = epoch_order(s.seed, epoch, len(self.data))
        count = self.steps_per_epoch * s.accum_iter
        micro = shard_micro_batches(keys, s.batch_size, count, self.world)
        done_in_epoch = self.step - epoch * self.steps_per_epoch
        batches = self.data.batches(micro[done_in_epoch * s.accum_iter :])
        self.model.train()
        sums: dict[str, float] = {}
        images, steps, lr = 0, 0, 0.0
        started = time.perf_counter()
        bar = tqdm(
            total=self.steps_per_epoch, initial=done_in_epoch,
            disable=not (s.progress and self.world.main),
            desc=f"epoch {epoch + 1}/{s.epochs}", unit="step", leave=False, dynamic_ncols=True,
        )  # fmt: skip
        for _ in range(done_in_epoch, self.steps_per_epoch):
            lr = self.schedule.apply()
            value, step_images = self._optimiser_step(batches, sums)
            images += step_images
            self.lrs.append(lr)
            self.step += 1
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            if s.save_every_steps and self.step % s.save_every_steps == 0:
                self.save()
            if after_step is not None:
                after_step(self.step)
        bar.close()
        elapsed = time.perf_counter() - started
        record = self._epoch_record(sums, images, steps * s.accum_iter, lr, elapsed)
        self._end_epoch(record)
        return record

    def _optimiser_step(
        self, batches: Iterator[Batch], sums: dict[str, float]
    ) -> tuple[float, int]:
        """``accum_iter`` micro-batches then one optimiser and schedule step.

        Adds each micro-batch's loss (and parts) to ``sums``; returns the last micro-batch's
        loss and the number of images used.
        """
        s = self.s
        value, images = 0.0, 0
        for i in range(s.accum_iter):
            x, y = next(batches)
            x = x.to(s.device, non_blocking=True)
            y = y.to(s.device, non_blocking=True)
            value, parts = self._micro_batch(x, y, sync=i == s.accum_iter - 1)
            for k, v in {"loss": value, **parts}.items():
                sums[k] = sums.get(k, 0.0) + v
            images += x.shape[0]
        if s.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), s.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        return value, images

    def _micro_batch(self, x: Tensor, y: Tensor, sync: bool) -> tuple[float, dict[str, float]]:
        """Forward and backward of one micro-batch (loss scaled by 1/``accum_iter``).

        ``sync``: the last micro-batch of a step, whose backward all-reduces the gradients
        under DistributedDataParallel. Raises TrainingError on a non-finite loss.
        """
        s = self.s
        sync = sync or not self.world.distributed
        with nullcontext() if sync else self.train_model.no_sync():  # type: ignore[operator]
            with torch.autocast(
                s.device.type, dtype=s.amp or torch.bfloat16, enabled=s.amp is not None
            ):
                loss, parts = self.step_fn(self.train_model, x, y, self.noise)
            value = float(loss.detach())
            if not np.isfinite(value):
                raise TrainingError(
                    f"loss is {value} at step {self.step} (epoch {self.epoch + 1}); stopping. "
                    "Lower the learning rate or use --amp bf16/off."
                )
            backward: Callable[[], None] = self.scaler.scale(loss / s.accum_iter).backward
            backward()  # (torch's Tensor.backward is unannotated)
        return value, parts

    def _epoch_record(
        self, sums: dict[str, float], images: int, micro: int, lr: float, elapsed: float
    ) -> dict[str, Any]:
        """The epoch's record: means over every micro-batch of every process; images/s of the
        whole run (a collective call)."""
        counts = {"_images": float(images), "_micro": float(micro)}
        totals = all_sum({**sums, **counts}, self.world, self.s.device)
        micro_done = max(totals.pop("_micro"), 1.0)
        images_all = totals.pop("_images")
        return {
            "epoch": self.epoch + 1,
            "step": self.step,
            "lr": lr,
            **{k: v / micro_done for k, v in totals.items()},
            "samples_per_s": images_all / max(elapsed, 1e-9),
            "epoch_s": elapsed,
        }

    def _end_epoch(self, record: dict[str, Any]) -> None:
        """Evaluate (when due) into ``record``, advance the epoch, save, append to the log."""
        s, epoch = self.s, self.epoch
        last = epoch + 1 == s.epochs
        if self.evaluate is not None and (last or (epoch + 1) % max(s.eval_every, 1) == 0):
            record.update(self.evaluate(self.model))
            self.model.train()
        self.epoch += 1
        self.save()
        if self.world.main:
            with open(self.out_dir / LOG_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.log(format_record(record, s.epochs))


def _quiet(_: str) -> None:
    """The log of ranks other than 0."""


# Settings added after runs were saved without them, with the value those runs used.
ADDED_SETTINGS: dict[str, Any] = {"loss_on": "all", "arch": None}


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run's settings as compared on resume: the global batch, not how it is split."""
    out = {k: v for k, v in config.items() if k not in BATCH_SPLIT}
    for key, value in ADDED_SETTINGS.items():
        if out.get(key, value) == value:
            out.pop(key, None)
    if "effective_batch" not in out:  # saved before multi-process training: one process
        out["effective_batch"] = int(config["batch_size"]) * int(config["accum_iter"])
    return out


def _batch_hint(diffs: list[str]) -> str:
    if not any(d.startswith("effective_batch") for d in diffs):
        return ""
    return (
        ". The global batch is processes x --batch-size x --accum-iter: choose them so that "
        "it matches the saved run's"
    )


def training_record(
    stage: str,
    cfg: RunOptions,
    lr: float,
    run: TrainingRun,
    data: TrainData,
    device: torch.device,
    **extra: Any,
) -> dict[str, Any]:
    """What a checkpoint records about the run that made it (recipe, data, environment).

    ``effective_batch`` is the global batch of one optimiser step: ``world_size`` processes x
    ``batch_size`` x ``accum_iter`` (the last two are per process, in ``recipe``).
    """
    from models.training.schedule import ADAMW_BETAS

    return {
        "stage": stage,
        "recipe": cfg.recipe(),
        "optimizer": {"name": "AdamW", "betas": list(ADAMW_BETAS), "lr": lr},
        "effective_batch": run.global_batch,
        "world_size": run.world.size,
        "steps": run.step,
        "dataset": data.describe(),
        **extra,
        "command": cfg.command,
        "torch": torch.__version__,
        "device": device.type,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def write_checkpoint(
    out: str | Path,
    export: str | Path | None,
    model: nn.Module,
    meta: CheckpointMeta,
    log: Callable[[str], None],
) -> Path:
    """Save the final model as OUT/checkpoint.safetensors (and EXPORT); returns the last path."""
    path = Path(out) / CHECKPOINT_FILE
    model.eval()
    save_checkpoint(path, model, meta)
    if export:
        save_checkpoint(export, model, meta)
        path = Path(export)
    log(f"wrote {path}")
    return path


def format_record(record: dict[str, Any], epochs: int) -> str:
    """The per-epoch log line: epoch, step, loss (and parts), lr, samples/s, evaluation."""
    head = f"epoch {record['epoch']}/{epochs} step {record['step']}"
    skip = {"epoch", "step", "lr", "samples_per_s", "epoch_s"}
    parts = [f"{k} {v:.4f}" for k, v in record.items() if k not in skip]
    return f"{head} lr {record['lr']:.3e} samples/s {record['samples_per_s']:.0f} " + " ".join(
        parts
    )
