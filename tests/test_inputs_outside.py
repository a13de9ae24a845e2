"""Input kinds found by an outside check after issue 9: the certified tensor is still the image a
person sees, and extreme numbers get a sentence, not a 500.

- PNG colour keys in the file's sample scale (2- and 4-bit grey) and ones that can no longer be
  matched (16-bit RGB);
- an animated PNG whose still image is not one of its frames;
- an XMP ``tiff:Orientation`` without EXIF (browsers ignore it);
- alpha below 1e-100 (1/alpha overflows), time budgets near the float maximum, evaluation
  ``skip``/``max`` beyond the stored integers;
- tar metadata records (pax, GNU long names) too large to hold in memory;
- a multipart field given twice.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from domain.errors import ServiceError
from domain.intake.images import decode_image
from models.images import ImageError, read_image

MAX_PIXELS = 10_000_000


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(samples: np.ndarray, depth: int, colour_type: int, trns: bytes) -> bytes:
    """A PNG written by hand (Pillow cannot save 2- or 4-bit grey): rows of ``samples``
    (h, w) or (h, w, 3) packed at ``depth`` bits, with a tRNS chunk."""
    rows = samples.reshape(samples.shape[0], -1)
    body = b""
    for row in rows:
        if depth >= 8:
            packed = row.astype(">u2" if depth == 16 else "u1").tobytes()
        else:
            bits = "".join(format(int(v), f"0{depth}b") for v in row)
            bits += "0" * (-len(bits) % 8)
            packed = int(bits, 2).to_bytes(len(bits) // 8, "big")
        body += b"\x00" + packed
    h, w = samples.shape[:2]
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"tRNS", trns)
        + _chunk(b"IDAT", zlib.compress(body)) + _chunk(b"IEND", b"")
    )  # fmt: skip


def both_paths(data: bytes, tmp_path: Path) -> list[torch.Tensor]:
    """The tensor of an upload (API, verifier, archives) and of the same file read by the CLI."""
    path = tmp_path / "x.png"
    path.write_bytes(data)
    return [decode_image(data, 8, MAX_PIXELS).tensor, read_image(path, 8).tensor]


@pytest.mark.parametrize("depth", [2, 4])
def test_low_bit_grey_transparent_key_is_composited_on_white(depth: int, tmp_path: Path) -> None:
    top = 2**depth - 1
    samples = np.full((8, 8), top - 1)  # a light grey everywhere ...
    samples[:, :4] = 1  # ... but the left half has the transparent grey
    data = raw_png(samples, depth, 0, struct.pack(">H", 1))
    grey = (top - 1) * (255 // top) / 255
    for x in both_paths(data, tmp_path):
        assert torch.all(x[:, :, :4] == 1.0), "transparent pixels must show the white background"
        assert torch.allclose(x[:, :, 4:], torch.tensor(grey))


def test_low_bit_grey_without_matching_pixels_is_unchanged(tmp_path: Path) -> None:
    samples = np.full((8, 8), 2)
    data = raw_png(samples, 2, 0, struct.pack(">H", 1))  # key 1 names no pixel
    for x in both_paths(data, tmp_path):
        assert torch.allclose(x, torch.tensor(170 / 255))


def test_sixteen_bit_rgb_colour_key_is_refused_not_dropped(tmp_path: Path) -> None:
    samples = np.zeros((8, 8, 3), dtype=np.int64)
    samples[:, :4] = [65535, 0, 0]
    data = raw_png(samples, 16, 2, struct.pack(">HHH", 65535, 0, 0))
    with pytest.raises(ServiceError) as exc:
        decode_image(data, 8, MAX_PIXELS)
    assert exc.value.status_code == 422
    assert "16-bit RGB PNG with a transparent colour" in str(exc.value)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="16-bit RGB PNG"):
        read_image(path, 8)


def _apng(default_image: bool) -> bytes:
    frames = [Image.new("L", (8, 8), v) for v in (0, 255, 128)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:], default_image=default_image)
    return buf.getvalue()


def test_apng_with_a_still_image_outside_the_animation_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ServiceError) as exc:
        decode_image(_apng(True), 8, MAX_PIXELS)
    assert exc.value.status_code == 422
    assert "still image is not part of its animation" in str(exc.value)
    path = tmp_path / "a.png"
    path.write_bytes(_apng(True))
    with pytest.raises(ImageError, match="animated PNG"):
        read_image(path, 8)


def test_apng_whose_still_image_is_its_first_frame_is_certified_with_a_warning() -> None:
    done = decode_image(_apng(False), 8, MAX_PIXELS).input
    assert torch.all(done.tensor == 0.0)  # frame 1: black
    assert any("only frame 1 of 3" in w for w in done.warnings)


XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
    'xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)


def _asymmetric() -> Image.Image:
    arr = np.zeros((8, 8), dtype=np.uint8)
    arr[0, :] = 255  # a white top row: any rotation moves it
    return Image.fromarray(arr, "L")


def _with_xmp(fmt: str, exif_orientation: int | None) -> bytes:
    img = _asymmetric()
    buf = io.BytesIO()
    exif = Image.Exif()
    if exif_orientation is not None:
        exif[0x0112] = exif_orientation
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", XMP)
        img.save(buf, "PNG", pnginfo=info, exif=exif if exif_orientation else None)
    else:
        kw: dict[str, Any] = {"xmp": XMP.encode()}
        if exif_orientation:
            kw["exif"] = exif
        img.convert("RGB").save(buf, fmt, lossless=True, quality=100, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_xmp_orientation_alone_is_not_applied(fmt: str) -> None:
    done = decode_image(_with_xmp(fmt, None), 8, MAX_PIXELS).input
    assert not any("exif_transpose" in s for s in done.steps)
    top = done.tensor[0, 0].mean().item()
    assert top > 0.8, "the stored top row stays on top: no viewer turns this image"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_exif_orientation_wins_over_xmp(fmt: str) -> None:
    done = decode_image(_with_xmp(fmt, 3), 8, MAX_PIXELS).input  # EXIF 3: 180 degrees
    assert "exif_transpose(3)" in done.steps
    assert done.tensor[0, -1].mean().item() > 0.8  # the white row is now at the bottom


def test_alpha_below_the_floor_is_a_value_error_not_an_overflow() -> None:
    from models.smoothing import MIN_ALPHA, min_n, validate

    for alpha in (5e-324, 1e-320, 1e-310, 1e-101):
        with pytest.raises(ValueError, match=r"alpha must lie in \[1e-100, 0.5\)"):
            validate(0.25, alpha, 1000)
    assert min_n("certify", MIN_ALPHA) == 333  # 0.5^333 < 1e-100 < 0.5^332
    assert min_n("certify", 1e-320) > 1000  # no overflow below the floor either


def test_a_huge_time_budget_runs_to_n() -> None:
    from models.smoothing import BatchSampler, certify

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    sampler = BatchSampler(model, 3, 256)
    x = torch.zeros(3, 8, 8)
    for budget in (1e300, 1e308, 1.7976931348623157e308):
        cert = certify(sampler, x, 0.25, 20, 2000, 0.001, seed=0, time_budget_s=budget)
        assert cert.n == 2000


def _pax_tar(record_bytes: int) -> bytes:
    buf = io.BytesIO()
    png = io.BytesIO()
    Image.new("L", (8, 8), 0).save(png, "PNG")
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("7/a.png")
        info.size = len(png.getvalue())
        info.pax_headers = {"comment": "a" * record_bytes}
        tar.addfile(info, io.BytesIO(png.getvalue()))
    return buf.getvalue()


def _gnu_long_name_tar(name_bytes: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("7/" + "b" * name_bytes + ".png")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    return buf.getvalue()


def _limits() -> Any:
    from domain.intake.archives import Limits

    return Limits(
        archive_bytes=50 << 20, members=1000, expanded_bytes=1 << 30, member_bytes=1 << 20
    )


@pytest.mark.parametrize("build", [_pax_tar, _gnu_long_name_tar])
def test_tar_metadata_records_over_the_cap_are_refused_before_they_are_read(
    build: Any, tmp_path: Path
) -> None:
    from domain.intake.archives import MAX_TAR_METADATA_BYTES, unpack

    data = build(MAX_TAR_METADATA_BYTES + 1)
    assert len(data) < 200_000  # compresses to almost nothing: the attack's point
    with pytest.raises(ServiceError) as exc:
        unpack(io.BytesIO(data), tmp_path / "out", _limits())
    assert exc.value.status_code == 413
    assert "metadata record" in str(exc.value)


def test_tar_metadata_records_under_the_cap_are_fine(tmp_path: Path) -> None:
    from domain.intake.archives import unpack

    members = unpack(io.BytesIO(_pax_tar(10_000)), tmp_path / "out", _limits())
    assert [m.name for m in members] == ["7/a.png"]


# ---------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fastapi.testclient import TestClient
    from service_support import service_settings

    from cli.asgi import create_app
    from domain.keys import create_key

    data = tmp_path_factory.mktemp("outside") / "data"
    app = create_app(service_settings(data, register_bundled=True, batch_size=1000))
    with TestClient(app) as client:
        with app.state.db.session() as s:
            key = create_key(s, "mallory")[1]
            client.app_state_admin = create_key(s, "root", admin=True)[1]  # type: ignore[attr-defined]
        client.headers["X-API-Key"] = key
        yield client


def _digit_png() -> bytes:
    from service_support import digit_png

    return digit_png(0)


FORM = {"model": "digits-s0.25", "n0": "100", "n": "500"}


@pytest.mark.parametrize("alpha", ["5e-324", "1e-320", "1e-310", "1e-101"])
def test_tiny_alpha_is_a_422_sentence_on_certify_and_evaluations(http: Any, alpha: str) -> None:
    r = http.post(
        "/certify", files={"image": ("x.png", _digit_png())}, data={**FORM, "alpha": alpha}
    )
    assert r.status_code == 422 and "alpha must lie in [1e-100, 0.5)" in r.text, r.text
    r = http.post("/evaluations", data={**FORM, "dataset": "digits:test", "alpha": alpha})
    assert r.status_code == 422 and "alpha must lie in [1e-100, 0.5)" in r.text, r.text
    assert http.get("/healthz").status_code == 200  # the connection still answers


@pytest.mark.parametrize("field", ["skip", "max"], ids=["skip", "max"])
@pytest.mark.parametrize("value", ["2147483648", "9223372036854775808", "99999999999999999999999"])
def test_evaluation_selection_beyond_stored_integers_is_a_422(
    http: Any, field: str, value: str
) -> None:
    r = http.post("/evaluations", data={**FORM, "dataset": "digits:test", field: value})
    assert r.status_code == 422, r.text
    # the schema now declares the bounds (1 to 2**31 - 1), so FastAPI's sentence names them
    assert f"{field}: Input should be less than or equal to 2147483647" in r.text
    assert http.get("/evaluations").json()["items"] == []  # nothing stored


def test_a_huge_time_budget_certifies_to_n_over_http(http: Any) -> None:
    from service_support import wait_for

    r = http.post(
        "/certify",
        files={"image": ("x.png", _digit_png())},
        data={**FORM, "seed": "7", "time_budget_s": "1e308"},
    )
    assert r.status_code == 202, r.text
    job = wait_for(http.get, r.json()["url"], http.headers["X-API-Key"])
    assert job["status"] == "succeeded", job
    assert job["certificate"]["n"] == 500


@pytest.mark.parametrize(
    ("files", "data", "named"),
    [
        ([("image", ("a.png", b"x")), ("image", ("b.png", b"y"))], {}, "'image'"),
        ([("image", ("a.png", b"x"))], {"sigma": ["0.25", "0.5"]}, "'sigma'"),
    ],
    ids=["two images", "two sigmas"],
)
def test_a_form_field_given_twice_is_a_422_naming_it(
    http: Any, files: Any, data: Any, named: str
) -> None:
    r = http.post("/certify", files=files, data={**FORM, **data})
    assert r.status_code == 422, r.text
    assert f"form field {named} given more than once" in r.json()["detail"]


@pytest.mark.parametrize(
    ("path", "form", "files"),
    [
        ("/evaluations", {"dataset": "digits:test", "seed": "3"}, None),
        ("/evaluations", {"dataset": "digits:test"}, {"image": ("x.png", b"x")}),
        ("/certify", {"sigmaa": "0.25"}, {"image": ("x.png", b"x")}),
    ],
    ids=["evaluation seed", "evaluation image", "misspelt sigma"],
)
def test_a_form_field_the_route_does_not_take_is_a_422_naming_it(
    http: Any, path: str, form: dict[str, str], files: Any
) -> None:
    r = http.post(path, data={**FORM, **form}, files=files)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith("unknown form field") and f"{path} takes" in detail, detail
    assert http.get("/evaluations").json()["items"] == []  # nothing stored


def test_a_refused_checkpoint_upload_is_named_as_uploaded_not_by_server_path(http: Any) -> None:
    r = http.post(
        "/admin/models",
        headers={"X-API-Key": http.app_state_admin},
        files={"file": ("text.png", b"not a checkpoint at all")},
        data={"name": "junk"},
    )
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail.startswith("checkpoint refused: the upload 'text.png'"), detail
    assert "uploaded" not in detail.replace("the upload", "") and "/" not in detail, detail


def test_a_json_route_sent_a_form_says_it_wants_json(http: Any) -> None:
    r = http.post(
        "/admin/training",
        headers={"X-API-Key": http.app_state_admin},
        data={"kind": "finetune", "dataset": "digits:train"},
    )
    assert r.status_code == 422, r.text
    assert "the body must be a JSON object, sent with Content-Type: application/json" in r.text
