"""Shared test fixtures: small architectures and base classifiers with exactly known behaviour."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from scipy.stats import norm
from torch import Tensor, nn

from models.networks import ArchConfig


class KnownProbabilityClassifier(nn.Module):
    """Base classifier whose class probabilities under Gaussian noise are known exactly.

    It looks only at the first coordinate of its (noisy) input: class ``i`` when that coordinate
    falls in the ``i``-th interval cut at ``sigma * Phi^-1(p_0 + ... + p_i)``. At an input whose
    first coordinate is 0, noise ``N(0, sigma^2)`` therefore gives class ``i`` with probability
    ``p_i``. Logits are one-hot.
    """

    cuts: Tensor

    def __init__(self, probs: Sequence[float], sigma: float):
        super().__init__()
        if abs(sum(probs) - 1.0) > 1e-9 or min(probs) < 0:
            raise ValueError("probs must be a probability vector")
        cum = torch.tensor(probs, dtype=torch.float64).cumsum(0)[:-1]
        cuts = sigma * torch.from_numpy(norm.ppf(cum.numpy()))
        self.register_buffer("cuts", cuts.float())
        self.num_classes = len(probs)

    def forward(self, x: Tensor) -> Tensor:
        cls = torch.bucketize(x.flatten(1)[:, 0].contiguous(), self.cuts)
        return nn.functional.one_hot(cls, self.num_classes).float()


KnownClassifierFactory = Callable[..., tuple[KnownProbabilityClassifier, Tensor]]


@pytest.fixture
def known_classifier() -> KnownClassifierFactory:
    """``make(probs, sigma, shape=(1, 2, 2))`` -> (classifier, the input x = zeros(shape))."""

    def make(
        probs: Sequence[float], sigma: float, shape: Sequence[int] = (1, 2, 2)
    ) -> tuple[KnownProbabilityClassifier, Tensor]:
        return KnownProbabilityClassifier(probs, sigma), torch.zeros(tuple(shape))

    return make


@pytest.fixture
def small_arch() -> ArchConfig:
    """A ViT small enough to build and run in milliseconds on a CPU (16x16 images, 4x4 patches)."""
    return ArchConfig(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
    )


@pytest.fixture(scope="session", autouse=True)
def redis_left_as_found() -> Iterator[None]:
    """The end-of-session check that the tests leave no keys in the test Redis database
    (``DMAE_TEST_REDIS``): keys that appeared during the session and are still there fail it,
    named (and are deleted, so the next session starts clean). Tests that talk to Redis clean
    up with ``service_support.redis_cleaned``. Nothing is checked when Redis does not answer
    (the tests that need it say so)."""
    import redis
    from preflight import REDIS_URL

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        before = set(client.scan_iter())
    except redis.exceptions.RedisError:
        client.close()
        yield
        return
    yield
    try:
        left = sorted(set(client.scan_iter()) - before)
        for key in left:
            client.delete(key)
    finally:
        client.close()
    if left:
        names = ", ".join(k.decode(errors="replace") for k in left[:10])
        pytest.fail(f"the tests left {len(left)} key(s) in Redis {REDIS_URL}: {names}")
