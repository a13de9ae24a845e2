"""The optimiser recipe: AdamW parameter groups and the warm-up + half-cycle cosine schedule.

Following MAE/DMAE: no weight decay on biases, norms, any 1-D parameter and the position /
class / mask tokens; optional layer-wise lr decay (ViT fine-tuning), where parameter group
``lr_scale`` multiplies the scheduled lr. The schedule is stepped once per optimiser step.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn

NO_DECAY_NAMES = frozenset(
    {"pos_embed", "cls_token", "mask_token", "decoder_pos_embed", "dist_token", "reg_token"}
)
ADAMW_BETAS = (0.9, 0.95)
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def scaled_lr(base_lr: float, effective_batch: int) -> float:
    """The linear scaling rule: lr = base lr x effective batch / 256."""
    return base_lr * effective_batch / 256


def decays(name: str, param: nn.Parameter) -> bool:
    """Whether a parameter gets weight decay (not biases, norms, 1-D params or tokens)."""
    return not (param.ndim <= 1 or name.endswith(".bias") or name in NO_DECAY_NAMES)


def vit_layer_id(name: str, num_layers: int) -> int:
    """Depth of a ViT parameter for layer decay: embeddings 0, block i -> i + 1, rest last."""
    if name in ("cls_token", "pos_embed", "mask_token", "dist_token", "reg_token"):
        return 0
    if name.startswith("patch_embed."):
        return 0
    match = _BLOCK.match(name)
    if match:
        return int(match.group(1)) + 1
    return num_layers


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    num_blocks: int | None = None,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay / no decay, and ``lr_scale`` per layer if ``layer_decay``.

    With layer decay (``num_blocks`` = encoder depth), a parameter at layer id ``l`` of
    ``L = num_blocks + 1`` gets ``lr_scale = layer_decay ** (L - l)``: the head keeps the full
    lr, the patch embedding the smallest.
    """
    if layer_decay is not None and num_blocks is None:
        raise ValueError("layer decay needs the number of encoder blocks")
    num_layers = (num_blocks or 0) + 1
    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = decays(name, param)
        layer = vit_layer_id(name, num_layers) if layer_decay is not None else 0
        scale = layer_decay ** (num_layers - layer) if layer_decay is not None else 1.0
        group = groups.setdefault(
            (decay, layer),
            {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale},
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.AdamW:
    """AdamW with the published betas (0.9, 0.95); weight decay is set per group."""
    return torch.optim.AdamW(groups, lr=lr, betas=ADAMW_BETAS)


class WarmupCosine:
    """Linear warm-up to ``base_lr`` over ``warmup_steps``, then a half-cycle cosine to ``min_lr``.

    ``apply()`` writes the lr of the current step into every parameter group (times its
    ``lr_scale``); ``step()`` advances. The state is just the step count and the shape, so a
    resumed run continues the exact same sequence.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        warmup_steps: int,
        total_steps: int,
        min_lr: float = 0.0,
    ):
        if total_steps < 1:
            raise ValueError("the schedule needs at least one step")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warm-up of {warmup_steps} steps does not fit {total_steps} steps")
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr = min_lr
        self.step_num = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )

    def apply(self) -> float:
        """Set the current step's lr on the optimiser; returns the unscaled lr."""
        lr = self.lr_at(self.step_num)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def step(self) -> None:
        self.step_num += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "step_num": self.step_num,
            "base_lr": self.base_lr,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr": self.min_lr,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shape = ("base_lr", "warmup_steps", "total_steps", "min_lr")
        if any(state[k] != getattr(self, k) for k in shape):
            raise ValueError(
                "the saved lr schedule differs from this run's "
                f"({ {k: state[k] for k in shape} } vs { {k: getattr(self, k) for k in shape} })"
            )
        self.step_num = int(state["step_num"])
