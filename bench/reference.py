"""The benchmark's baseline: the sampling loop as Cohen et al.'s reference code writes it.

fp32, ``x.repeat(batch)`` + ``torch.randn_like`` noise, batch 400, counts moved to the host
after every batch. It only exists to be timed against the engine; certificates always come from
:func:`models.smoothing.certify` (this loop's counts are never turned into one).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

REFERENCE_BATCH = 400


def reference_counts(
    model: nn.Module,
    x: Tensor,
    sigma: float,
    num: int,
    num_classes: int,
    batch_size: int = REFERENCE_BATCH,
) -> np.ndarray:
    """Class counts of ``num`` noisy copies of ``x`` (on the model's device), Cohen-style."""
    with torch.no_grad():
        counts = np.zeros(num_classes, dtype=np.int64)
        remaining = num
        for _ in range(-(-num // batch_size)):
            this_batch = min(batch_size, remaining)
            remaining -= this_batch
            batch = x.repeat((this_batch, 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
        return counts
