"""Floating-point soundness of the sampler (docs/DESIGN.md section 6; Voracek and Hein, ICLR 2023).

The sampler evaluates the base classifier on fl32(x + fl32(sigma * Z)), not on x + sigma * Z:
the rounding of the sum depends on x, so the law of the noised input is not a translate of one
law. A base classifier that reads the rounding (here: "is every pixel a multiple of 2^-25?",
true for every sum whose magnitude is >= 1/4, rarely for noise near 0) gets a certificate that
the exact-arithmetic theorem forbids. These tests pin that the project's own sampler is
affected (the claim in DESIGN.md).
"""

from __future__ import annotations

import torch
from scipy.stats import norm
from torch import Tensor, nn

from models.smoothing import BatchSampler, NoiseStream, certify

GRID = 2.0**-25
SIGMA = 0.25


class GridReader(nn.Module):
    """Class 1 when every pixel of the noised input lies on the 2^-25 grid, else class 0."""

    def forward(self, z: Tensor) -> Tensor:
        on_grid = (torch.frac(z.double() / GRID) == 0).flatten(1).all(dim=1).float()
        return torch.stack([1.0 - on_grid, on_grid], dim=1)


def grid_rate(x: Tensor, n: int, seed: int) -> float:
    z = x.unsqueeze(0) + SIGMA * NoiseStream(seed, x.shape).take(n)
    return float(GridReader()(z)[:, 1].mean())


def test_the_float32_sampler_certifies_a_radius_the_exact_theorem_forbids() -> None:
    sampler = BatchSampler(GridReader(), num_classes=2, batch_size=1000)
    x = torch.full((2, 1, 1), 0.5)  # two pixels at 0.5: every noised sum lands on the grid
    x_near = torch.zeros(2, 1, 1)  # both pixels at 0: L2 distance sqrt(0.5) = 0.707
    cert = certify(sampler, x, SIGMA, 100, 10_000, 0.001, seed=0)
    assert cert.prediction == 1 and cert.radius > 0.75  # all 10,000 hits
    distance = float(torch.linalg.vector_norm(x - x_near))
    assert distance < cert.radius
    # Exact arithmetic: every class-1 probability within the radius is at least
    # Phi(Phi^-1(pa_lower) - distance / sigma) (Cohen et al. 2019, Neyman-Pearson) > 1/2.
    promised = float(norm.cdf(norm.ppf(cert.pa_lower) - distance / SIGMA))
    assert promised > 0.6
    # In float32 the noise near 0 is finer than the grid: class 1 is the minority there.
    observed = grid_rate(x_near, 20_000, seed=1)
    assert observed < 0.35 < promised
    near = certify(sampler, x_near, SIGMA, 100, 10_000, 0.001, seed=2)
    assert near.prediction == 0  # a certified radius around x that contains x_near: false
