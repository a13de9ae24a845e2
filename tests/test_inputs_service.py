"""The service certifies exactly the image the user sees (issue 9 items 1-6 over HTTP; issue 16
item 6): the embedded service with the bundled ``digits-s0.25``, sigma 0.25, n0 100, n 1000,
alpha 0.001; and migration 0003 on SQLite and Postgres."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_support import OLD_KEY_AND_MODEL, database, pg_url, service_settings, wait_for  # noqa: F401

from cli.asgi import create_app
from domain.keys import create_key
from models.data import load_digits_split

ISSUE = {"model": "digits-s0.25", "n0": "100", "n": "1000", "alpha": "0.001"}


def png(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def digit_u8(index: int = 0) -> np.ndarray:
    x, _, _ = load_digits_split("test")
    return np.round(x[index, 0].numpy() * 255).astype(np.uint8)


class Client:
    def __init__(self, client: TestClient, key: str):
        self.client, self.key = client, key

    def submit(self, image: bytes, **form: str) -> Any:
        return self.client.post(
            "/certify",
            headers={"X-API-Key": self.key},
            files={"image": ("x.png", image)},
            data={**ISSUE, **form},
        )

    def done(self, image: bytes, **form: str) -> dict[str, Any]:
        r = self.submit(image, **form)
        assert r.status_code in (200, 202), r.text
        job = wait_for(self.client.get, r.json()["url"], self.key)
        assert job["status"] == "succeeded", job
        return job


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Client]:
    app = create_app(service_settings(tmp_path / "data", register_bundled=True, batch_size=1000))
    with TestClient(app) as client:
        with app.state.db.session() as s:
            key = create_key(s, "alice")[1]
        yield Client(client, key)


def test_exif_rotated_upload_is_certified_upright_and_is_the_upright_job(api: Client) -> None:
    """Item 1 over HTTP: the EXIF-6 digit was certified as a 4."""
    big = Image.fromarray(digit_u8()).resize((64, 64), Image.Resampling.NEAREST)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = api.done(png(big.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes()))
    cert = rotated["certificate"]
    assert cert["prediction"] == 7 and cert["label"] == "7" and cert["radius"] > 0.5
    assert "exif_transpose(6)" in cert["preprocessing"] == rotated["preprocessing"]
    upright = api.submit(png(big))
    assert upright.status_code == 200 and upright.json()["id"] == rotated["id"]


def test_alpha_and_sixteen_bit_uploads_are_certified_as_shown(api: Client) -> None:
    """Items 2 and 3 over HTTP: transparency composited on white, 16-bit not saturated."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = digit_u8()
    job = api.done(png(Image.fromarray(rgba, "RGBA")))
    assert "RGBA: alpha: composite on white" in job["certificate"]["preprocessing"]
    assert any("composited on white" in w for w in job["certificate"]["warnings"])

    x, _, _ = load_digits_split("test")
    sixteen = Image.fromarray(np.round(x[0, 0].numpy().astype(np.float64) * 65535).astype("<u2"))
    cert = api.done(png(sixteen))["certificate"]
    assert cert["prediction"] == 7 and cert["radius"] > 0.5  # saturated: 0.157
    assert "16-bit grey / 65535" in cert["preprocessing"]


def test_the_same_pixels_re_encoded_are_the_same_job(api: Client) -> None:
    """Item 5: the no-re-roll identity is the tensor, not the uploaded bytes."""
    img = Image.fromarray(np.dstack([digit_u8(3), 255 - digit_u8(3), digit_u8(3) // 2]))
    from PIL.PngImagePlugin import PngInfo

    text_chunk = PngInfo()
    text_chunk.add_text("Comment", "same pixels, other bytes")
    original = png(img)
    first = api.submit(original)
    assert first.status_code == 202, first.text
    job = first.json()
    encodings = {
        "PNG with a text chunk": png(img, pnginfo=text_chunk),
        "PNG, opaque alpha channel": png(img.convert("RGBA")),
        "PNG, palette": png(img.convert("P", palette=Image.Palette.ADAPTIVE)),
        "WebP lossless": png(img, "WEBP", lossless=True),
    }
    for name, data in encodings.items():
        assert data != original, name
        r = api.submit(data)
        assert r.status_code == 200 and r.json()["id"] == job["id"], name
        assert r.json()["tensor_sha256"] == job["tensor_sha256"]
    assert job["seed"] == api.submit(png(img)).json()["seed"]  # derived from the tensor
    other = np.asarray(img).copy()
    other[0, 0, 0] ^= 1
    assert api.submit(png(Image.fromarray(other))).status_code == 202


def test_tensor_sha256_is_the_stored_tensor(api: Client, tmp_path: Path) -> None:
    from models.images import preprocess_image

    img = Image.fromarray(digit_u8(5))
    job = api.submit(png(img)).json()
    x = preprocess_image(img, 8).tensor
    assert job["tensor_sha256"] == hashlib.sha256(x.numpy().astype("<f4").tobytes()).hexdigest()


@pytest.mark.parametrize(
    ("form", "minimum"),
    [
        ({"n": "5"}, "n >= 10"),
        ({"n": "9", "mode": "predict"}, "n >= 11"),
        ({"n": "10", "mode": "certify_top2"}, "n >= 11"),
        ({"n": "6", "alpha": "0.01"}, "n >= 7"),
    ],
)
def test_n_too_small_for_alpha_is_a_422_with_the_minimum(
    api: Client, form: dict[str, str], minimum: str
) -> None:
    """Item 6: n=5 at alpha 0.001 was accepted and reported max_radius -0.168."""
    r = api.submit(png(Image.fromarray(digit_u8())), **form)
    assert r.status_code == 422, r.text
    assert minimum in r.json()["detail"] and "too small" in r.json()["detail"]


def test_top2_certificates_report_their_own_cap(api: Client) -> None:
    from models.smoothing import max_radius

    cert = api.done(png(Image.fromarray(digit_u8())), mode="certify_top2")["certificate"]
    assert cert["max_radius"] == max_radius(0.25, 1000, 0.0005) < max_radius(0.25, 1000, 0.001)
    assert cert["radius"] <= cert["max_radius"]


def test_far_from_domain_inputs_carry_size_scale_and_warnings(api: Client) -> None:
    """Issue 16 item 6: a 640x427 photo shrunk 53x to 8x8 was certified without a word."""
    from sklearn.datasets import load_sample_images

    job = api.done(png(Image.fromarray(load_sample_images().images[0])))
    assert job["original_size"] == [640, 427] and job["scale"] == pytest.approx(8 / 427)
    assert job["warnings"] == ["downscaled 53x to the model's 8x8 input"]
    cert = job["certificate"]
    assert (cert["original_size"], cert["scale"], cert["warnings"]) == (
        job["original_size"],
        job["scale"],
        job["warnings"],
    )
    assert cert["preprocessing"][0] == "decode PNG RGB 640x427"
    strip = api.submit(png(Image.new("L", (1, 4_000_000))))  # item 4: accepted, said so
    assert strip.status_code == 202, strip.text
    assert any("centre crop keeps only" in w for w in strip.json()["warnings"])


# ---------------------------------------------------------------- migration 0003


def test_migration_0003_backfills_the_tensor_sha256_of_existing_jobs(database: str) -> None:
    import sqlalchemy as sa

    from domain.store import migrate
    from domain.store.db import make_engine

    migrate.upgrade(database, "0002")
    data = np.random.default_rng(0).random((3, 8, 8)).astype("<f4").tobytes()
    engine = make_engine(database)
    with engine.begin() as conn:
        for statement in OLD_KEY_AND_MODEL:
            conn.execute(sa.text(statement))
        conn.execute(sa.text(
            "INSERT INTO jobs (id, owner_id, request_key, mode, checkpoint_id, model_name, sigma, "
            "alpha, n0, n, seed, input_sha256, input_shape, status, progress_done, "
            "progress_total, attempts, created_at) VALUES ('j', 1, 'k', 'certify', 1, 'm', 0.25, "
            "0.001, 100, 1000, 7, 'b', '[3, 8, 8]', 'succeeded', 0, 0, 1, CURRENT_TIMESTAMP)"
        ))  # fmt: skip
        conn.execute(
            sa.text("INSERT INTO job_inputs (job_id, shape, data) VALUES ('j', '[3, 8, 8]', :d)"),
            {"d": data},
        )
        conn.execute(sa.text(
            "INSERT INTO certificates (job_id, abstained, radius, body, created_at) "
            "VALUES ('j', false, 0.5, '{}', CURRENT_TIMESTAMP)"
        ))  # fmt: skip

    def survivors() -> tuple[int, int]:  # altering ``jobs`` must not cascade to its children
        with engine.connect() as conn:
            count = "SELECT (SELECT count(*) FROM job_inputs), (SELECT count(*) FROM certificates)"
            inputs, certificates = conn.execute(sa.text(count)).one()
        return int(inputs), int(certificates)

    migrate.upgrade(database)
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT tensor_sha256, input_record FROM jobs")).one()
    assert row[0] == hashlib.sha256(data).hexdigest()
    assert row[1] in ({}, "{}")
    assert survivors() == (1, 1)
    migrate.downgrade(database, "0002")
    with engine.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    assert "tensor_sha256" not in columns and "input_record" not in columns
    assert survivors() == (1, 1)
    engine.dispose()
