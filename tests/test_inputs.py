"""The one image conversion (issue 9, items 1-5): the certified tensor is the image a person sees.

Regression tests use the failing inputs of the issue on the bundled ``digits-s0.25`` (sigma 0.25,
n0 100, n 1000, alpha 0.001) through ``models.data.preprocess``, the entry point that existed
before; the other members of each kind (every EXIF orientation, every alpha mode, every bit
depth, both extreme aspect ratios, other encoders of the same pixels) follow.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.data import load_digits_split, load_image, preprocess

SEVEN = 0  # digits:test index 0 is a 7
DIGITS = "digits-s0.25"


def digit(index: int = SEVEN) -> np.ndarray:
    """Test digit ``index`` as 8x8 floats in [0, 1] (0..16 / 16)."""
    x, _, _ = load_digits_split("test")
    return x[index, 0].numpy().astype(np.float64)


def digit_u8(index: int = SEVEN) -> np.ndarray:
    return np.round(digit(index) * 255).astype(np.uint8)


def encode(img: Image.Image, fmt: str = "PNG", **kw: Any) -> Image.Image:
    """``img`` written as ``fmt`` and read back (what a client uploads)."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.fixture(scope="module")
def bundled() -> Callable[[torch.Tensor], Any]:
    """certify(x) on the bundled digits-s0.25 with the issue's parameters, seed 0."""
    from models.checkpoints import load_classifier_with_meta
    from models.smoothing import BatchSampler, certify

    model, meta = load_classifier_with_meta(DIGITS)
    sampler = BatchSampler(model, meta.num_classes, 1000)
    return lambda x: certify(sampler, x, 0.25, 100, 1000, 0.001, seed=0)


# ---------------------------------------------------------------- 1. EXIF orientation

# Orientation o -> how a viewer turns the stored pixels upright, and its inverse (to store).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
INVERSE = {**UPRIGHT, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def stored_with_orientation(upright: Image.Image, orientation: int) -> tuple[Image.Image, Any]:
    """(pixels as a camera stores them, EXIF block saying how to show them upright)."""
    stored = upright if orientation == 1 else upright.transpose(INVERSE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return stored, exif


def big_seven() -> Image.Image:
    """The issue's 64x64 digit 7 (each digit pixel an 8x8 block)."""
    return Image.fromarray(digit_u8()).resize((64, 64), Image.Resampling.NEAREST)


def test_exif_orientation_6_digit_is_certified_upright(bundled: Any) -> None:
    """Issue item 1: stored rotated with orientation 6, it was certified as a 4 (r=0.30)."""
    upright = preprocess(encode(big_seven()), 8)
    stored, exif = stored_with_orientation(big_seven(), 6)
    rotated = preprocess(encode(stored, exif=exif.tobytes()), 8)
    assert torch.equal(rotated, upright)
    cert, want = bundled(rotated), bundled(upright)
    assert cert.prediction == 7 and cert.radius == want.radius > 0.5


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG", "TIFF"])
def test_every_orientation_in_every_format_gives_the_upright_tensor(
    orientation: int, fmt: str
) -> None:
    from models.images import preprocess_image

    rng = np.random.default_rng(orientation)
    pixels = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)  # not square: rotations show
    upright = Image.fromarray(pixels)
    stored, exif = stored_with_orientation(upright, orientation)
    codec: dict[str, Any] = {"WEBP": {"lossless": True}, "JPEG": {"quality": 100}}.get(fmt, {})
    done = preprocess_image(encode(stored, fmt, exif=exif.tobytes(), **codec), 6)
    want = preprocess_image(encode(upright, fmt, **codec), 6)
    tol = 0.1 if fmt == "JPEG" else 0.0  # JPEG: lossy, and its blocks differ once rotated
    assert (done.tensor - want.tensor).abs().max() <= tol
    assert done.original_size == (10, 6)  # as displayed
    assert (f"exif_transpose({orientation})" in done.steps) == (orientation != 1)


def test_an_invalid_orientation_is_ignored_with_a_warning() -> None:
    from models.images import preprocess_image

    img = Image.fromarray(digit_u8())
    exif = Image.Exif()
    exif[0x0112] = 9
    done = preprocess_image(encode(img, exif=exif.tobytes()), 8)
    assert torch.equal(done.tensor, preprocess(img, 8))
    assert any("orientation 9" in w for w in done.warnings)


# ---------------------------------------------------------------- 2. transparency


def composite_on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """What a browser shows on a white page, in [0, 1] (independent of Pillow)."""
    a = alpha.astype(np.float64)[..., None] / 255 if colour.ndim == 3 else alpha / 255
    return (colour.astype(np.float64) * a + 255 * (1 - a)) / 255


def test_alpha_carried_digit_is_composited_on_white_not_dropped() -> None:
    """Issue item 2: RGB black, the digit in alpha: the model saw an all-black image."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = digit_u8()
    x = preprocess(encode(Image.fromarray(rgba, "RGBA")), 8)
    want = composite_on_white(np.zeros((8, 8, 3)), digit_u8()).transpose(2, 0, 1)
    assert np.abs(x.numpy() - want).max() <= 1 / 255 + 1e-6
    assert float(x.min()) < 0.1 and float(x.max()) == 1.0  # the digit is visible
    from models.images import preprocess_image

    done = preprocess_image(Image.fromarray(rgba, "RGBA"), 8)
    assert "RGBA: alpha: composite on white" in done.steps
    assert any("transparent" in w and "white" in w for w in done.warnings)


def _alpha_cases() -> dict[str, tuple[Image.Image, np.ndarray]]:
    """Each alpha-carrying mode -> (image, expected grey/RGB in [0, 1] on white)."""
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    key = grey == grey[2, 2]  # one transparent grey value
    la = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)])
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    palette_rgb = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (8, 8), dtype=np.uint8)
    p = Image.fromarray(index, "P")
    p.putpalette(palette_rgb.flatten().tolist())
    p.info["transparency"] = 5
    p_alphas = rng.integers(0, 256, 16, dtype=np.uint8)  # a PNG palette with per-entry alpha
    p_levels = Image.fromarray(index, "P")
    p_levels.putpalette(palette_rgb.flatten().tolist())
    p_levels.info["transparency"] = p_alphas.tobytes()
    pa_alpha = np.where(index % 3 == 0, 0, 200).astype(np.uint8)
    pa = Image.merge("PA", [Image.fromarray(index), Image.fromarray(pa_alpha)])
    pa.putpalette(palette_rgb.flatten().tolist())
    l_key = Image.fromarray(grey)
    l_key.info["transparency"] = int(grey[2, 2])
    rgb_key = Image.fromarray(rgb)
    rgb_key.info["transparency"] = tuple(int(v) for v in rgb[4, 4])
    rgb_key_mask = (rgb == rgb[4, 4]).all(axis=2)
    sixteen = (grey.astype(np.uint16) * 257).astype(np.uint16)
    i16 = Image.fromarray(sixteen)
    i16.info["transparency"] = int(sixteen[2, 2])
    bits = grey > 127
    one = Image.fromarray(bits.astype(np.uint8) * 255).convert("1")
    one.info["transparency"] = 0
    return {
        "RGBA": (rgba, composite_on_white(rgb, alpha)),
        "RGBa (premultiplied)": (rgba.convert("RGBa"), composite_on_white(rgb, alpha)),
        "LA": (la, composite_on_white(grey, alpha)),
        "La (premultiplied)": (la.convert("La"), composite_on_white(grey, alpha)),
        "P with a transparent index": (
            p,
            np.where((index == 5)[..., None], 1.0, palette_rgb[index] / 255),
        ),
        "P with per-entry alpha": (
            encode(p_levels),
            composite_on_white(palette_rgb[index], p_alphas[index]),
        ),
        "PA": (pa, composite_on_white(palette_rgb[index], pa_alpha)),
        "L with a transparent value": (l_key, np.where(key, 1.0, grey / 255)),
        "RGB with a transparent colour": (
            rgb_key,
            np.where(rgb_key_mask[..., None], 1.0, rgb / 255),
        ),
        "I;16 with a transparent value": (i16, np.where(key, 1.0, sixteen / 65535)),
        "1 with a transparent value": (one, np.where(bits, 1.0, 1.0)),  # black is transparent
    }


@pytest.mark.parametrize("case", list(_alpha_cases()))
def test_every_alpha_mode_is_composited_on_white(case: str) -> None:
    from models.images import preprocess_image

    img, want = _alpha_cases()[case]
    done = preprocess_image(img, 8)
    got = done.tensor.numpy()
    want3 = np.repeat(want[None], 3, 0) if want.ndim == 2 else want.transpose(2, 0, 1)
    tol = 1e-6 if case.startswith("I;16") else 1 / 255 + 1e-6  # premultiplied: 8-bit rounding
    if "premultiplied" in case:
        tol = 3 / 255
    assert np.abs(got - want3).max() <= tol, case
    assert any("alpha: composite on white" in s for s in done.steps), done.steps
    assert any("composited on white" in w for w in done.warnings)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_a_fully_opaque_alpha_channel_is_removed_and_recorded(mode: str) -> None:
    from models.images import preprocess_image

    grey = Image.fromarray(digit_u8())
    img = Image.merge("LA", [grey, Image.new("L", (8, 8), 255)]).convert(mode)
    done = preprocess_image(encode(img) if mode != "PA" else img, 8)
    assert torch.equal(done.tensor, preprocess(grey, 8))
    assert any("alpha fully opaque, removed" in s for s in done.steps)
    assert done.warnings == []


# ---------------------------------------------------------------- 3. bit depths and modes


def test_sixteen_bit_digit_is_not_saturated(bundled: Any) -> None:
    """Issue item 3: the digit as a 16-bit PNG had two values and radius 0.157, not 0.616."""
    sixteen = np.round(digit() * 65535).astype(np.uint16)
    img = encode(Image.fromarray(sixteen))
    assert img.mode == "I;16"
    x = preprocess(img, 8)
    digit16 = torch.from_numpy(digit()).float().expand(3, 8, 8)
    assert torch.allclose(x, digit16, atol=0.5 / 65535 + 1e-7)  # 16-bit rounding only
    assert len(torch.unique(x)) > 2
    cert = bundled(x)
    assert cert.prediction == 7 and cert.radius > 0.6


def _ramp() -> np.ndarray:
    return (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4 + 2).astype(np.uint8)


def _modes() -> dict[str, tuple[Image.Image, np.ndarray]]:
    """Mode -> (image of the ramp in that mode, the [0, 1] values a viewer shows)."""
    ramp = _ramp()
    unit = ramp / 255.0
    sixteen = ramp.astype(np.uint16) * 257  # v/255 == (257 v)/65535 exactly
    grey = Image.fromarray(ramp)
    rgb = Image.merge("RGB", [grey, Image.fromarray(255 - ramp), Image.fromarray(ramp // 2)])
    rgb_unit = np.asarray(rgb) / 255.0
    cases = {
        "1": (grey.convert("1", dither=Image.Dither.NONE), (ramp >= 128).astype(float)),
        "L": (grey, unit),
        "P": (rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256), None),
        "RGB": (rgb, rgb_unit),
        "RGBA": (rgb.convert("RGBA"), rgb_unit),
        "LA": (grey.convert("LA"), unit),
        "CMYK": (rgb.convert("CMYK"), rgb_unit),  # Pillow's CMYK round trip is exact
        "I": (Image.fromarray(sixteen.astype(np.int32)), unit),
        "F": (Image.fromarray(unit.astype(np.float32)), unit),
    }
    for mode, dtype in (("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2"), ("I;16N", "=u2")):
        cases[mode] = (Image.frombytes(mode, (8, 8), sixteen.astype(dtype).tobytes()), unit)
    return cases  # type: ignore[return-value]


@pytest.mark.parametrize("mode", list(_modes()))
def test_every_mode_maps_to_unit_range_as_shown(mode: str) -> None:
    img, want = _modes()[mode]
    assert img.mode == mode
    got = preprocess(img, 8).numpy()
    if want is None:  # palette: its own colours
        want = np.asarray(img.convert("RGB")) / 255.0
    want3 = np.repeat(want[None], 3, 0) if want.ndim == 2 else want.transpose(2, 0, 1)
    assert np.abs(got - want3).max() <= 1e-6, mode


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F", "L"])
def test_high_bit_depths_keep_their_precision_through_the_resize(mode: str) -> None:
    """A 16-bit ramp resized to 8x8 is not quantised to 8 bits (and matches 8-bit data)."""
    from models.images import preprocess_image

    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (40, 40)).astype(np.uint16)
    unit = values / 65535.0
    if mode == "L":
        img = Image.fromarray(np.round(unit * 255).astype(np.uint8))
    elif mode == "I":
        img = Image.fromarray(values.astype(np.int32))
    elif mode == "F":
        img = Image.fromarray(unit.astype(np.float32))
    else:
        img = Image.frombytes(mode, (40, 40), values.astype(">u2" if "B" in mode else "<u2"))
    got = preprocess_image(img, 8).tensor
    ref = Image.fromarray(unit.astype(np.float32)).resize((8, 8), Image.Resampling.BICUBIC)
    want = np.clip(np.asarray(ref), 0, 1)
    assert np.abs(got[0].numpy() - want).max() <= (1 / 255 if mode == "L" else 1e-6)
    if mode != "L":
        assert not np.allclose(got.numpy() * 255, np.round(got.numpy() * 255), atol=1e-3)


def test_values_with_no_standard_display_are_refused_or_clipped() -> None:
    from models.images import ImageError, preprocess_image

    with pytest.raises(ImageError, match="0..65535"):
        preprocess_image(Image.fromarray(np.full((4, 4), 70_000, np.int32)), 4)
    with pytest.raises(ImageError, match="NaN"):
        preprocess_image(Image.fromarray(np.full((4, 4), np.nan, np.float32)), 4)
    wide = preprocess_image(
        Image.fromarray(np.linspace(-1, 2, 16, dtype=np.float32).reshape(4, 4)), 4
    )
    assert float(wide.tensor.min()) == 0.0 and float(wide.tensor.max()) == 1.0
    assert any("clipped" in w for w in wide.warnings)


# ---------------------------------------------------------------- 4. extreme aspect ratios

MEMORY_PROBE = textwrap.dedent(
    """
    import io, resource, sys, time
    from PIL import Image
    from models.data import preprocess
    w, h = int(sys.argv[1]), int(sys.argv[2])
    buf = io.BytesIO()
    Image.new("L", (w, h), 0).save(buf, "PNG")
    data = buf.getvalue()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = preprocess(Image.open(io.BytesIO(data)), 8)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(len(data), grown // 1024, "x".join(map(str, x.shape)), float(x.abs().max()))
    """
)


@pytest.mark.parametrize("size", [(1, 4_000_000), (4_000_000, 1)])
def test_an_extreme_strip_costs_no_more_memory_than_its_decode(size: tuple[int, int]) -> None:
    """Issue item 4: a 1 x 4,000,000 black PNG (8 KB) took +3 GB (the short side was resized
    first, to 8 x 32,000,000). Now the peak growth is the decoded strip and little more."""
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(size[0]), str(size[1])],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    nbytes, grown_mb, shape, peak = out.stdout.split()
    assert int(nbytes) < 10_000 and shape == "3x8x8" and float(peak) == 0.0
    assert int(grown_mb) < 300, f"preprocessing grew the process by {grown_mb} MB"


@pytest.mark.parametrize("size", [(3000, 10), (10, 3000), (7, 5), (5, 7), (640, 427)])
def test_the_certified_square_is_the_centre_of_any_aspect_ratio(size: tuple[int, int]) -> None:
    """Left/top third red, middle third blue, rest green: the centre square is all blue."""
    from models.images import preprocess_image

    w, h = size
    long = max(w, h)
    img = Image.new("RGB", size, (0, 255, 0))
    band = (long // 3, 0, long - long // 3, h) if w >= h else (0, long // 3, w, long - long // 3)
    img.paste((255, 0, 0), (0, 0, band[0], h) if w >= h else (0, 0, w, band[1]))
    img.paste((0, 0, 255), band)
    done = preprocess_image(img, 4)
    blue = torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).expand(3, 4, 4)
    if min(size) <= long // 3:  # the centre square lies inside the middle band
        assert torch.equal(done.tensor, blue), size
    assert done.original_size == size and done.scale == 4 / min(size)
    kept = min(size) ** 2 / (w * h)
    assert any("centre crop keeps only" in m for m in done.warnings) == (kept < 0.5)


def test_scale_warnings_name_the_factor() -> None:
    """Issue 16 item 6: a 640x427 photo shrunk 53x to 8x8 says so; native sizes say nothing."""
    from models.images import preprocess_image

    photo = preprocess_image(Image.new("RGB", (640, 427)), 8)
    assert "downscaled 53x to the model's 8x8 input" in photo.warnings
    assert photo.original_size == (640, 427) and photo.scale == pytest.approx(8 / 427)
    assert preprocess_image(Image.new("RGB", (64, 64)), 8).warnings == []  # 8x: in range
    tiny = preprocess_image(Image.new("RGB", (8, 8)), 224)
    assert tiny.warnings[0].startswith("upscaled 28x to the model's 224x224 input (from 8x8)")


# ---------------------------------------------------------------- 5. identity of the pixels


def _encodings(img: Image.Image) -> dict[str, Image.Image]:
    return {
        "PNG": encode(img),
        "PNG, best compression, text chunk": encode(img, compress_level=9),
        "PNG, opaque alpha": encode(img.convert("RGBA")),
        "PNG, palette": encode(img.convert("P", palette=Image.Palette.ADAPTIVE)),
        "WebP lossless": encode(img, "WEBP", lossless=True),
        "BMP": encode(img, "BMP"),
        "BMP converted to PNG": encode(encode(img, "BMP")),
        "TIFF": encode(img, "TIFF"),
        "GIF": encode(img.convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
    }


def test_the_same_pixels_in_every_lossless_encoding_are_the_same_tensor() -> None:
    from models.images import preprocess_image

    rgb = np.dstack([digit_u8(), 255 - digit_u8(), digit_u8() // 3])  # < 256 colours
    img = Image.fromarray(rgb)
    want = preprocess_image(img, 8)
    for name, decoded in _encodings(img).items():
        got = preprocess_image(decoded, 8)
        assert got.tensor_sha256 == want.tensor_sha256, name
    other = rgb.copy()
    other[0, 0, 0] ^= 1  # one least significant bit
    assert preprocess_image(Image.fromarray(other), 8).tensor_sha256 != want.tensor_sha256


def test_tensor_sha256_is_the_float32_bytes() -> None:
    import hashlib

    from models.images import tensor_sha256

    x = torch.rand(3, 8, 8)
    assert tensor_sha256(x) == hashlib.sha256(x.numpy().astype("<f4").tobytes()).hexdigest()
    assert tensor_sha256(x.double()) == tensor_sha256(x)


def test_animation_and_colour_profiles_are_reported(tmp_path: Path) -> None:
    from PIL import ImageCms

    from models.images import preprocess_image

    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    anim = preprocess_image(Image.open(io.BytesIO(buf.getvalue())), 8)
    assert "frame 1 of 2" in anim.steps and any("frame 1 of 2" in w for w in anim.warnings)
    assert float(anim.tensor[0].min()) == 1.0  # the first frame (red)
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    tagged = preprocess_image(encode(Image.new("RGB", (8, 8)), icc_profile=srgb), 8)
    assert not any("ICC" in w for w in tagged.warnings)
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    foreign = preprocess_image(encode(Image.new("RGB", (8, 8)), icc_profile=lab), 8)
    assert any("ICC colour profile" in w and "not applied" in w for w in foreign.warnings)


def test_files_read_through_load_image_name_themselves_when_broken(tmp_path: Path) -> None:
    from models.images import ImageError

    good = tmp_path / "good.png"
    Image.fromarray(digit_u8()).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:40])
    (tmp_path / "text.png").write_text("not an image")
    assert load_image(good, 8).shape == (3, 8, 8)
    for name in ("cut.png", "text.png"):
        with pytest.raises(ImageError, match=name):
            load_image(tmp_path / name, 8)
