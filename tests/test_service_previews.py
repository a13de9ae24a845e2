"""GET /jobs/{id}/input.png and /jobs/{id}/noisy.png: the certified tensor and noisy copies of it.

- input.png is the stored tensor the certificate is about, pixel for pixel (round(255 x)).
- noisy.png is clip(x + sigma z) with z from the display seed (a hash of the job id and
  "display"), never from the certificate's seed; the same job always shows the same copies.
- Both are owner-only (another client's job is 404, like an unknown one); k is checked (422).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from service_support import (  # noqa: F401 - tiny_checkpoint is a fixture
    SIGMA,
    digit_png,
    service_settings,
    tiny_checkpoint,
    wait_for,
)
from test_service_embedded import Service, service  # noqa: F401 - service is a fixture

from domain import previews
from models.data import preprocess
from models.smoothing import NoiseStream


def pixels(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.mode == "RGB"
    return np.asarray(img)


def shown(x: torch.Tensor) -> np.ndarray:
    """What a (3, S, S) tensor looks like as 8-bit pixels: clip, round(255 x), (S, S, 3)."""
    return x.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def strip(copies: torch.Tensor) -> np.ndarray:
    """k copies side by side with one white column between them, as the route lays them out."""
    parts = []
    for i, c in enumerate(copies):
        if i:
            parts.append(np.full((c.shape[1], 1, 3), 255, np.uint8))
        parts.append(shown(c))
    return np.concatenate(parts, axis=1)


def test_input_png_is_the_certified_tensor(service: Service) -> None:
    png = digit_png(4)
    job = service.submit(service.alice, png).json()
    r = service.client.get(f"{job['url']}/input.png", headers=service.h(service.alice))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["cache-control"] == "no-store"
    x = preprocess(Image.open(io.BytesIO(png)), 8)
    assert np.array_equal(pixels(r.content), shown(x))


def test_noisy_strip_uses_the_display_seed_not_the_certificates(service: Service) -> None:
    png = digit_png(2)
    job = service.submit(service.alice, png, seed="12345").json()
    done = service.wait(service.alice, job["url"])
    assert done["status"] == "succeeded"
    x = preprocess(Image.open(io.BytesIO(png)), 8)
    url = f"{job['url']}/noisy.png"
    got = {k: service.client.get(url, params={"k": k}, headers=service.h(service.alice)) for k in
           (1, 4, 16)}  # fmt: skip
    for k, r in got.items():
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
        assert pixels(r.content).shape == (8, 8 * k + (k - 1), 3)
    four = pixels(got[4].content)
    want = x + SIGMA * NoiseStream(previews.display_seed(job["id"]), x.shape).take(4)
    assert np.array_equal(four, strip(want))
    # The certificate's own first samples (its seed, the same stream) are not what is shown.
    theirs = x + SIGMA * NoiseStream(12345, x.shape).take(4)
    assert not np.array_equal(four, strip(theirs))
    # Deterministic per job, and the first k of 16 are the k.
    again = service.client.get(url, params={"k": 4}, headers=service.h(service.alice))
    assert again.content == got[4].content
    assert np.array_equal(pixels(got[16].content)[:, : 4 * 9 - 1], four)
    # The default is 4 copies.
    default = service.client.get(url, headers=service.h(service.alice))
    assert default.content == got[4].content


def test_display_seed_depends_on_the_job_only() -> None:
    a, b = previews.display_seed("job-a"), previews.display_seed("job-b")
    assert a != b and a == previews.display_seed("job-a") and 0 <= a < 2**63
    # The noise added is N(0, sigma^2) per pixel before clipping: over 16 copies of a mid-grey
    # 3x32x32 input (49,152 values), the standard deviation is sigma to within 2%.
    x = torch.full((3, 32, 32), 0.5)
    z = (previews.noisy_copies(x, 0.1, 16, a) - x) / 0.1
    assert abs(float(z.std()) - 1.0) < 0.02 and abs(float(z.mean())) < 0.02
    with pytest.raises(ValueError, match="k must lie in"):
        previews.noisy_copies(x, 0.1, 17, a)


def test_previews_are_owner_only_and_k_is_checked(service: Service) -> None:
    job = service.submit(service.alice, digit_png(1)).json()
    for path in ("input.png", "noisy.png"):
        url = f"{job['url']}/{path}"
        bob = service.client.get(url, headers=service.h(service.bob))
        unknown = service.client.get(f"/jobs/nope/{path}", headers=service.h(service.alice))
        for r in (bob, unknown):
            assert r.status_code == 404 and r.json()["detail"].endswith("not found"), r.text
        assert service.client.get(url).status_code == 401
    url = f"{job['url']}/noisy.png"
    for k, message in (
        ("0", "k: Input should be greater than or equal to 1"),
        ("17", "k: Input should be less than or equal to 16"),
        ("four", "k: Input should be a valid integer"),
    ):
        r = service.client.get(url, params={"k": k}, headers=service.h(service.alice))
        assert r.status_code == 422 and message in r.json()["detail"], r.text
    wait_for(service.client.get, job["url"], service.alice)
