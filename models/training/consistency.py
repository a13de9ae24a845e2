"""Consistency regularisation for Gaussian-noise training (Jeong & Shin, NeurIPS 2020).

With m noisy copies of each input, p_i the softmax of copy i and p_bar their mean:

    loss = mean_i CE(p_i, y) + lambda * mean_i KL(p_bar || p_i) + eta * H(p_bar)

averaged over the batch. DMAE uses m = 2, lambda = 2, eta = 0.5 (sigma 0.25, 0.5) or 0.1 (1.0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_LAMBDA = 2.0


def default_eta(sigma: float) -> float:
    """The published entropy weight: 0.5 for sigma <= 0.5, 0.1 for larger sigma (1.0)."""
    return 0.5 if sigma <= 0.5 else 0.1


@dataclass
class ConsistencyLoss:
    """The loss and its parts (detached parts, for logging)."""

    total: Tensor
    ce: float
    kl: float
    entropy: float


def soft_targets(target: Tensor, num_classes: int, label_smoothing: float = 0.0) -> Tensor:
    """Class indices (B,) -> smoothed one-hot (B, K); soft targets (B, K) pass through."""
    if target.ndim == 2:
        return target.float()
    onehot = F.one_hot(target, num_classes).float()
    return onehot * (1.0 - label_smoothing) + label_smoothing / num_classes


def consistency_loss(
    logits: Tensor,
    target: Tensor,
    lbd: float = DEFAULT_LAMBDA,
    eta: float = 0.5,
    label_smoothing: float = 0.0,
) -> ConsistencyLoss:
    """``logits`` (m, B, K) of m noisy copies; ``target`` (B,) class indices or (B, K) soft."""
    if logits.ndim != 3:
        raise ValueError(f"logits must be (copies, batch, classes), got {tuple(logits.shape)}")
    m, b, k = logits.shape
    log_p = F.log_softmax(logits.float(), dim=-1)
    soft = soft_targets(target, k, label_smoothing).to(log_p.device)
    ce = -(soft.unsqueeze(0) * log_p).sum(-1).mean()
    p_bar = log_p.exp().mean(0)
    log_p_bar = torch.log(p_bar.clamp_min(1e-20))
    kl = (p_bar.unsqueeze(0) * (log_p_bar.unsqueeze(0) - log_p)).sum(-1).mean()
    entropy = -(p_bar * log_p_bar).sum(-1).mean()
    total = ce + lbd * kl + eta * entropy
    return ConsistencyLoss(total, float(ce.detach()), float(kl.detach()), float(entropy.detach()))
