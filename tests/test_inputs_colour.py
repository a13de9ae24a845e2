"""Issue 26, items 1, 3 and 7: the certified tensor is the picture a browser draws, whatever the
colour metadata (gAMA, cHRM, sRGB, iCCP) and however much text a PNG carries; upsampling is
always said.

Every case runs through both doors: an upload (``domain.intake.images.decode_image``: API,
evaluations,
verifier) and a file (``models.images.read_image``: CLI, datasets).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from domain.errors import ServiceError
from domain.intake.images import decode_image
from models.images import ImageError, read_image

MAX_PIXELS = 10_000_000
SRGB_CHRM = (31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000)
ADOBE_RGB_CHRM = (31270, 32900, 64000, 33000, 21000, 71000, 15000, 6000)


def srgb_encode(light: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1: linear light -> sRGB value (the reference the tests compare with)."""
    return np.where(light <= 0.0031308, 12.92 * light, 1.055 * light ** (1 / 2.4) - 0.055)


def digit64() -> Image.Image:
    """Test digit 0 as a 64x64 RGB image (the issue's input)."""
    from models.data import load_digits_split

    x, _, _ = load_digits_split("test")
    arr = (x[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(arr).resize((64, 64), Image.Resampling.NEAREST)


def png(img: Image.Image, chunks: dict[bytes, bytes] | None = None, **kw: object) -> bytes:
    info = PngImagePlugin.PngInfo()
    for kind, data in (chunks or {}).items():
        info.add(kind, data)
    buf = io.BytesIO()
    img.save(buf, "PNG", pnginfo=info, **kw)
    return buf.getvalue()


def gama(gamma: float) -> dict[bytes, bytes]:
    return {b"gAMA": struct.pack(">I", round(gamma * 100000))}


def chrm(values: tuple[int, ...]) -> dict[bytes, bytes]:
    return {b"cHRM": struct.pack(">8I", *values)}


def tensors(data: bytes, tmp_path: Path, size: int = 64) -> list[torch.Tensor]:
    path = tmp_path / "x.png"
    path.write_bytes(data)
    return [decode_image(data, size, MAX_PIXELS).tensor, read_image(path, size).tensor]


def same(data: bytes, tmp_path: Path, size: int = 64) -> torch.Tensor:
    """The tensor both doors give (they must agree)."""
    api, cli = tensors(data, tmp_path, size)
    assert torch.equal(api, cli)
    return api


def record(data: bytes, size: int = 64) -> tuple[list[str], list[str]]:
    done = decode_image(data, size, MAX_PIXELS).input
    return done.steps, done.warnings


# ---------------------------------------------------------------- 1. gAMA, cHRM, sRGB


def test_gamma_002_is_drawn_dark_and_certified_so(tmp_path: Path) -> None:
    """The failing input: gAMA 0.02 made the same tensor_sha256 as no gAMA, without a word."""
    img = digit64()
    plain = same(png(img), tmp_path)
    dark = same(png(img, gama(0.02)), tmp_path)
    assert (
        decode_image(png(img), 64, MAX_PIXELS).tensor_sha256
        != decode_image(png(img, gama(0.02)), 64, MAX_PIXELS).tensor_sha256
    )
    v = np.asarray(img, dtype=np.float64) / 255
    want = np.round(srgb_encode(v ** (1 / 0.02)) * 255) / 255
    assert np.abs(dark.permute(1, 2, 0).numpy() - want).max() <= 1 / 255 + 1e-6
    assert float(dark.mean()) < float(plain.mean()) / 2  # Chromium: mean red 2.7 of 255
    steps, warnings = record(png(img, gama(0.02)))
    assert any("gAMA 0.02" in s for s in steps)
    assert any("gAMA 0.02" in w and "converted to sRGB" in w for w in warnings)
    linear = same(png(img, gama(1.0)), tmp_path)  # linear light: drawn brighter
    assert float(linear.mean()) > float(plain.mean())


@pytest.mark.parametrize(
    "chunks",
    [gama(0.45455), gama(0.45), {b"sRGB": b"\x00"}, {b"sRGB": b"\x00", **gama(0.02)},
     {**chrm(SRGB_CHRM), **gama(0.45455)}, chrm(SRGB_CHRM)],
    ids=["gAMA-45455", "gAMA-45000", "sRGB", "sRGB-wins-over-gAMA", "cHRM-sRGB+gAMA", "cHRM-sRGB"],
)  # fmt: skip
def test_what_a_viewer_takes_as_srgb_changes_nothing(
    chunks: dict[bytes, bytes], tmp_path: Path
) -> None:
    img = digit64()
    assert torch.equal(same(png(img, chunks), tmp_path), same(png(img), tmp_path))
    assert record(png(img, chunks))[1] == []


def test_a_foreign_gamut_is_refused_naming_chrm(tmp_path: Path) -> None:
    data = png(digit64(), {**chrm(ADOBE_RGB_CHRM), **gama(0.45455)})
    with pytest.raises(ServiceError) as refused:
        decode_image(data, 64, MAX_PIXELS)
    assert refused.value.status_code == 422 and "cHRM" in str(refused.value.detail)
    (tmp_path / "x.png").write_bytes(data)
    with pytest.raises(ImageError, match="cHRM"):
        read_image(tmp_path / "x.png", 64)


def test_invalid_gamma_zero_is_ignored_with_a_warning(tmp_path: Path) -> None:
    img = digit64()
    assert torch.equal(same(png(img, gama(0)), tmp_path), same(png(img), tmp_path))
    assert any("invalid PNG gAMA" in w for w in record(png(img, gama(0)))[1])


def _expected(v: np.ndarray, gamma: float) -> np.ndarray:
    return srgb_encode(v ** (1 / gamma))


def test_gamma_on_grey_palette_and_sixteen_bit(tmp_path: Path) -> None:
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # 64x64
    v = ramp.astype(np.float64) / 255
    for mode in ("L", "P", "RGB"):
        img = Image.fromarray(ramp).convert(mode)
        got = same(png(img, gama(1.0)), tmp_path)[0].numpy()
        assert np.abs(got - _expected(v, 1.0)).max() <= 1 / 255 + 1e-6, mode
    deep = (np.tile(np.linspace(0, 65535, 64), (64, 1))).astype(np.uint16)
    img16 = Image.fromarray(deep)
    got = same(png(img16, gama(2.2)), tmp_path)[0].numpy()  # 16-bit: exact in float
    want = _expected(deep.astype(np.float64) / 65535, 2.2)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_gamma_is_applied_before_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., :3] = 128
    rgba[..., 3] = 128  # half transparent
    got = same(png(Image.fromarray(rgba, "RGBA"), gama(1.0)), tmp_path)[0].numpy()
    colour = np.round(_expected(np.array(128 / 255), 1.0) * 255)
    want = (colour * 128 + 255 * 127) / 255 / 255  # browsers: convert, then composite
    assert np.abs(got - want).max() <= 2 / 255
    steps, warnings = record(png(Image.fromarray(rgba, "RGBA"), gama(1.0)))
    assert any("gAMA" in w for w in warnings) and any("transparent" in w for w in warnings)


# ---------------------------------------------------------------- 1. iCCP


LINEAR_CURVE = b"curv\0\0\0\0" + struct.pack(">I", 0)


def srgb_curve() -> bytes:
    """An ICC ``curv`` of 1024 entries sampling sRGB's decoding curve, as in the common
    "sRGB IEC61966-2.1" profiles."""
    v = np.linspace(0.0, 1.0, 1024)
    light = np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)
    table = np.round(light * 65535).astype(">u2").tobytes()
    return b"curv\0\0\0\0" + struct.pack(">I", 1024) + table


def icc_linear_srgb(name: str = "linear-light test", curve: bytes = LINEAR_CURVE) -> bytes:
    """A minimal ICC v2 RGB display profile: sRGB's primaries (D50-adapted) with linear
    (gamma 1.0) curves (or ``curve``), written by hand (Pillow can only create sRGB, LAB and
    XYZ profiles)."""

    def s15(v: float) -> bytes:
        return struct.pack(">i", round(v * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + s15(x) + s15(y) + s15(z)

    ascii_name = name.encode() + b"\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(ascii_name)) + ascii_name
    desc += struct.pack(">II", 0, 0) + struct.pack(">HB", 0, 0) + b"\0" * 67
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)),
        (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)),
        (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
        (b"cprt", b"text\0\0\0\0no copyright\0"),
    ]
    table, body = b"", b""
    offset = 128 + 4 + 12 * len(tags)
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = struct.pack(">I", size) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
    header += b"\0" * 12 + b"acsp" + b"\0" * 24 + struct.pack(">I", 0)
    header += s15(0.9642) + s15(1.0) + s15(0.8249) + b"\0" * 4 + b"\0" * 16 + b"\0" * 28
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def test_an_icc_profile_is_converted_to_srgb(tmp_path: Path) -> None:
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    img = Image.fromarray(ramp).convert("RGB")
    data = png(img, icc_profile=icc_linear_srgb())
    got = same(data, tmp_path)
    want = srgb_encode(ramp.astype(np.float64) / 255)
    for channel in got.numpy():
        assert np.abs(channel - want).max() <= 2 / 255  # LittleCMS against the formula
    steps, warnings = record(data)
    assert any("linear-light test" in s and "converted to sRGB" in s for s in steps)
    assert any("linear-light test" in w and "applied" in w for w in warnings)
    # The profile wins over gAMA and sRGB chunks, as in the PNG spec and Chromium.
    both = png(img, {**gama(0.02), b"sRGB": b"\x00"}, icc_profile=icc_linear_srgb())
    assert torch.equal(same(both, tmp_path), got)
    # With alpha: converted, then composited; as JPEG: the same policy.
    rgba = img.convert("RGBA")
    assert torch.equal(same(png(rgba, icc_profile=icc_linear_srgb()), tmp_path), got)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=100, icc_profile=icc_linear_srgb())
    jpeg = decode_image(buf.getvalue(), 64, MAX_PIXELS)
    assert any("linear-light test" in w for w in jpeg.input.warnings)
    assert float(jpeg.tensor.mean()) > float(decode_image(png(img), 64, MAX_PIXELS).tensor.mean())


def test_an_icc_profile_is_judged_by_what_it_does_not_by_its_name(tmp_path: Path) -> None:
    """A profile named "Linear sRGB" (sRGB's primaries, linear curves) was taken as sRGB by its
    name, so the tensor was that of the file without it, while a browser draws it far lighter;
    a profile that does act as sRGB, whatever its name, leaves the tensor unchanged."""
    img = digit64()
    plain = same(png(img), tmp_path)
    named = png(img, icc_profile=icc_linear_srgb("Linear sRGB"))
    unnamed = same(png(img, icc_profile=icc_linear_srgb()), tmp_path)
    assert torch.equal(same(named, tmp_path), unnamed)
    assert float(unnamed.mean()) > float(plain.mean()) + 0.05
    assert any("'Linear sRGB'" in w and "applied" in w for w in record(named)[1])
    for name in ("some display", "sRGB IEC61966-2.1"):
        data = png(img, icc_profile=icc_linear_srgb(name, srgb_curve()))
        assert torch.equal(same(data, tmp_path), plain)
        steps, warnings = record(data)
        assert any("taken as sRGB" in s for s in steps) and not warnings


def test_a_cicp_chunk_other_than_srgb_is_refused_through_both_doors(tmp_path: Path) -> None:
    """A PNG with cICP (Display P3 primaries 12, or PQ transfer 16) is drawn by browsers in
    that space; Pillow ignores the chunk, so it was certified as sRGB without a word."""
    img = digit64()
    plain = same(png(img), tmp_path)
    assert torch.equal(same(png(img, {b"cICP": bytes((1, 13, 0, 1))}), tmp_path), plain)
    for points in ((12, 13, 0, 1), (9, 16, 0, 1), (1, 13, 0, 0)):
        data = png(img, {b"cICP": bytes(points)})
        with pytest.raises(ServiceError, match="cICP") as caught:
            decode_image(data, 64, MAX_PIXELS)
        assert caught.value.status_code == 422
        path = tmp_path / "cicp.png"
        path.write_bytes(data)
        with pytest.raises(ImageError, match="cicp.png: the PNG cICP chunk"):
            read_image(path, 64)


def test_icc_profiles_that_cannot_apply_are_ignored_as_browsers_do(tmp_path: Path) -> None:
    from PIL import ImageCms

    img = digit64()
    plain = same(png(img), tmp_path)
    for profile in (b"not a profile at all", ImageCms.createProfile("XYZ")):
        blob = (
            profile if isinstance(profile, bytes) else ImageCms.ImageCmsProfile(profile).tobytes()
        )
        data = png(img, icc_profile=blob)
        assert torch.equal(same(data, tmp_path), plain)
        assert any("not applied" in w for w in record(data)[1])


# ---------------------------------------------------------------- 3. metadata memory


def _text_chunks(kind: bytes, count: int, size: int) -> bytes:
    """``count`` compressed text chunks of ``size`` bytes each (zTXt or iTXt)."""
    text = zlib.compress(b"a" * size, 9)
    out = b""
    for i in range(count):
        key = f"k{i}".encode()
        body = key + b"\0\0" + text if kind == b"zTXt" else key + b"\0\1\0\0\0" + text
        out += struct.pack(">I", len(body)) + kind + body
        out += struct.pack(">I", zlib.crc32(kind + body))
    return out


def with_chunks(data: bytes, extra: bytes, after_pixels: bool = False) -> bytes:
    """``extra`` chunks inserted right after IHDR (before the pixels), or before IEND."""
    end = len(data) - 12 if after_pixels else 8 + 12 + struct.unpack(">I", data[8:12])[0]
    return data[:end] + extra + data[end:]


@pytest.mark.parametrize("after_pixels", [False, True])
@pytest.mark.parametrize("kind", [b"zTXt", b"iTXt"])
def test_one_large_text_chunk_is_ignored_not_a_422(
    kind: bytes, after_pixels: bool, tmp_path: Path
) -> None:
    """Item 3: one 2 MB zTXt made a file every browser displays 'unreadable'."""
    img = digit64()
    data = with_chunks(png(img), _text_chunks(kind, 1, 2_000_000), after_pixels)
    assert torch.equal(same(data, tmp_path), same(png(img), tmp_path))


def test_sixty_megabyte_text_costs_nothing() -> None:
    """The issue's 66 KB PNG with 60 x 1 MB compressed text chunks: the text never reaches
    Pillow (its info holds none), so no memory is spent on it."""
    data = with_chunks(png(digit64()), _text_chunks(b"zTXt", 30, 1_000_000))
    data = with_chunks(data, _text_chunks(b"iTXt", 30, 1_000_000))
    assert len(data) < 200_000
    from models.images import without_text

    img = Image.open(io.BytesIO(without_text(data)))
    img.load()
    assert not any(k.startswith("k") for k in img.info)
    decode_image(data, 64, MAX_PIXELS)


def test_an_oversized_icc_profile_is_refused_saying_why(tmp_path: Path) -> None:
    profile = icc_linear_srgb() + b"\0" * 2_000_000  # 2 MB decompressed
    body = b"big\0\0" + zlib.compress(profile, 9)
    chunk = struct.pack(">I", len(body)) + b"iCCP" + body
    chunk += struct.pack(">I", zlib.crc32(b"iCCP" + body))
    data = with_chunks(png(digit64()), chunk)
    with pytest.raises(ServiceError) as refused:
        decode_image(data, 64, MAX_PIXELS)
    assert refused.value.status_code == 422
    assert "ICC colour profile (iCCP chunk) is larger than" in str(refused.value.detail)
    (tmp_path / "x.png").write_bytes(data)
    with pytest.raises(ImageError, match="iCCP"):
        read_image(tmp_path / "x.png", 64)


def test_a_damaged_text_chunk_is_dropped_and_a_damaged_structure_left_to_pillow() -> None:
    from models.images import without_text

    good = png(digit64())
    assert without_text(good) == good  # nothing to drop: the same bytes
    assert without_text(b"GIF89a...") == b"GIF89a..."
    truncated = good[:-30]  # inside the pixel data
    with pytest.raises(ServiceError) as refused:
        decode_image(truncated, 64, MAX_PIXELS)
    assert refused.value.status_code == 422


# ---------------------------------------------------------------- 7. upsampling


@pytest.mark.parametrize(
    ("side", "size", "factor"), [(8, 16, "2"), (12, 16, "1.33"), (63, 64, "1.02")]
)
def test_any_upsampling_is_said(side: int, size: int, factor: str) -> None:
    """Item 7: the 8x8 digit certified by a 16x16 model gave 0.6755 instead of 0.5766, without
    a word below 4x."""
    data = png(digit64().resize((side, side)))
    warnings = record(data, size)[1]
    assert any(w.startswith(f"upscaled {factor}x") and "not comparable" in w for w in warnings)
    assert not any("upscaled" in w for w in record(png(digit64()), 64)[1])
    assert not any("upscaled" in w for w in record(png(digit64()), 32)[1])


def test_the_certificate_says_radii_of_other_input_sizes_do_not_compare() -> None:
    from models.smoothing import SPACE

    assert "different input sizes are not comparable" in SPACE


def test_metadata_kept_with_an_image_counts_in_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """What stays after the text is dropped (ICC profile, EXIF) is charged to the image budget
    at BYTES_PER_PIXEL bytes a pixel, on top of the pixels."""
    import contextlib

    from domain.intake import images

    charged: list[int] = []

    @contextlib.contextmanager
    def taken(pixels: int, max_pixels: int) -> Iterator[None]:
        charged.append(pixels)
        yield

    monkeypatch.setattr(images.pixel_budget, "taken", taken)
    profile = icc_linear_srgb() + b"\0" * 400_000  # a padded profile: 400 KB kept
    decode_image(png(digit64(), icc_profile=profile), 64, MAX_PIXELS)
    decode_image(png(digit64()), 64, MAX_PIXELS)
    assert charged == [64 * 64 + len(profile) // images.BYTES_PER_PIXEL, 64 * 64]
