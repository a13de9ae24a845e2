"""What the model sees: a job's certified input tensor, and noisy copies of it, as PNG images.

- :func:`input_png` is the stored preprocessed tensor (the one the certificate's radius is
  about), quantised to 8 bits per channel for display: ``round(255 x)``.
- :func:`noisy_strip_png` shows ``k`` copies ``x + sigma * z`` side by side, clipped to [0, 1]
  for display only (the certificate's samples are never clipped: DESIGN.md section 1). ``z``
  comes from the same noise stream a certificate uses (``models.smoothing.NoiseStream``) but
  seeded by :func:`display_seed`, a hash of the job id and the label ``"display"``: the copies
  shown are never the certificate's noise, before or after the job runs, whatever seed the job
  has. The same job shows the same copies each time (the first ``k`` of 16 are the ``k``).
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import torch
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session
from torch import Tensor

from domain.errors import ServiceError, not_found
from domain.store.tables import Job, JobInput
from models.data import tensor_from_bytes
from models.smoothing import NoiseStream

MAX_COPIES = 16
DISPLAY_LABEL = "display"


def display_seed(job_id: str) -> int:
    """The seed of the noise shown for job ``job_id``: 63 bits of sha256(id, "display")."""
    digest = hashlib.sha256(f"{job_id}\x00{DISPLAY_LABEL}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def job_input(session: Session, owner_id: int, job_id: str) -> tuple[Job, Tensor]:
    """The job (of this owner only: another client's job is not found) and its certified input,
    a (3, S, S) float32 tensor in [0, 1]."""
    row = session.execute(
        select(Job, JobInput)
        .outerjoin(JobInput, JobInput.job_id == Job.id)
        .where(Job.id == job_id, Job.owner_id == owner_id)
    ).first()
    if row is None:
        raise not_found(f"job {job_id!r}")
    job, stored = row
    if stored is None:
        raise ServiceError(404, f"job {job_id!r} has no stored input")
    return job, tensor_from_bytes(stored.data, stored.shape)


def _png(images: list[Tensor], gap: int = 1) -> bytes:
    """(3, H, W) tensors in [0, 1], left to right with ``gap`` white columns between them."""
    h = images[0].shape[1]
    parts: list[Tensor] = []
    for i, x in enumerate(images):
        if i:
            parts.append(torch.ones(3, h, gap))
        parts.append(x.clamp(0.0, 1.0))
    arr = torch.cat(parts, dim=2).permute(1, 2, 0).mul(255.0).round().to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), "RGB").save(buf, "PNG")
    return buf.getvalue()


def input_png(x: Tensor) -> bytes:
    """The certified input ``x`` (3, S, S) as an S x S RGB PNG, ``round(255 x)`` per channel."""
    return _png([x])


def noisy_copies(x: Tensor, sigma: float, k: int, seed: int) -> Tensor:
    """``k`` copies ``x + sigma * z`` (k, 3, S, S), z ~ N(0, I) from the noise stream ``seed``;
    not clipped. ValueError unless 1 <= k <= MAX_COPIES."""
    if not 1 <= k <= MAX_COPIES:
        raise ValueError(f"k must lie in [1, {MAX_COPIES}], got {k}")
    z = NoiseStream(seed, tuple(x.shape)).take(k)
    return x.unsqueeze(0) + float(sigma) * z


def noisy_strip_png(job: Job, x: Tensor, k: int) -> bytes:
    """``k`` noisy copies of job ``job``'s input at its sigma, drawn from
    :func:`display_seed`, clipped to [0, 1] and laid side by side: a (S) x (k S + k - 1) PNG."""
    copies = noisy_copies(x, job.sigma, k, display_seed(job.id))
    return _png(list(copies))
