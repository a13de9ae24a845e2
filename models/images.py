"""The one image conversion: a decoded image -> the tensor a certificate's radius is about.

:func:`preprocess_image` is used by the API (``domain/intake/images.py``), the CLI and the datasets
alike.
It returns the (3, S, S) float32 tensor in [0, 1] and a record of every step taken, so that a
certificate can say exactly which image was certified. The policy, in order:

1. First frame only (an animation gets a warning). An animated PNG whose still (default) image
   is not an animation frame is refused: viewers disagree on which picture it is.
2. EXIF orientation applied (``ImageOps.exif_transpose``), for every orientation 2-8, as every
   viewer shows the image; an XMP ``tiff:Orientation`` alone is ignored, as browsers ignore
   it. ``original_size`` is the size *after* this step.
3. Samples mapped to [0, 1] as a viewer shows them: 1-bit 0/1; 8-bit modes (L, P, RGB, CMYK,
   YCbCr, LAB, HSV) via Pillow's conversion to RGB, then / 255; 16-bit grey (``I;16`` and its
   byte orders) / 65535; 32-bit integer grey (``I``) read as 16-bit samples (values outside
   0..65535 are refused); 32-bit float grey (``F``) taken as [0, 1] intensities, values outside
   clipped with a warning, NaN or infinity refused. Before that, colour metadata is applied as
   a browser draws it (:func:`_colour`): an embedded ICC profile is converted to sRGB (one
   acting as sRGB, unreadable or not fitting the image's colour space: values taken as sRGB); an
   ``sRGB`` chunk, or a ``gAMA`` of 45455 (within 1%), changes nothing; another ``gAMA`` is
   converted to sRGB as a power law; a ``cHRM`` other than sRGB's is refused. Every
   conversion is a step and a warning.
4. Transparency (RGBA, LA, PA, premultiplied RGBa/La, P, L, 1, RGB and I;16 with a transparent
   colour): composited onto **white** (:data:`ALPHA_BACKGROUND`), as a browser shows it on a
   default page; an alpha channel that is fully opaque is removed unchanged. Either way the
   step is recorded; never dropped silently.
5. The centred square of side ``min(w, h)`` (integer offsets in source pixels) is resized
   straight to S x S with Pillow's bicubic filter (``Image.resize(size, box=...)``), so memory
   stays O(S^2 + decoded image) whatever the aspect ratio. At S x S already: no resampling.
6. Grey images become 3 equal channels; float32; sha256 of those bytes is the input's identity.

Warnings flag inputs far from the model's domain: downscaled more than
:data:`DOWNSCALE_WARNING` x or upscaled at all (a radius in an upsampled space is not one in the
image's pixels), a centre crop that keeps less than :data:`CROP_WARNING` of the image,
transparency, clipped floats, animations, and colour conversions or profiles not applied.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError
from torch import Tensor

if TYPE_CHECKING:
    from PIL.ImageCms import ImageCmsProfile

T = TypeVar("T")

ALPHA_BACKGROUND = (255, 255, 255)
ALPHA_POLICY = "composite on white"
DOWNSCALE_WARNING = 8.0
CROP_WARNING = 0.5
ORIENTATION_TAG = 0x0112

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
HIGH_BIT = (*SIXTEEN_BIT, "I", "F")
WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
GREY = ("1", "L", "LA", "La")
TO_RGB = ("P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
SUPPORTED_MODES = (*HIGH_BIT, *GREY, *TO_RGB)


class ImageError(ValueError):
    """An image that cannot be read or converted; the message says why."""


@dataclass
class Preprocessed:
    """The certified tensor and what was done to get it.

    ``tensor``: (3, S, S) float32 in [0, 1]. ``original_size``: (width, height) as displayed
    (after EXIF orientation). ``scale``: output pixels per source pixel, S / min(w, h) (below 1
    is a downscale). ``steps``: the ordered preprocessing steps. ``warnings``: what a reader of
    the certificate should know (e.g. ``downscaled 53x to the model's 8x8 input``).
    """

    tensor: Tensor
    original_size: tuple[int, int]
    scale: float
    steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def tensor_sha256(self) -> str:
        return tensor_sha256(self.tensor)

    def record(self) -> dict[str, Any]:
        """The facts a certificate carries about its input (JSON-ready)."""
        return {
            "original_size": list(self.original_size),
            "scale": self.scale,
            "preprocessing": list(self.steps),
            "warnings": list(self.warnings),
        }


def tensor_sha256(x: Tensor) -> str:
    """sha256 of the tensor's float32 little-endian bytes in C order: the input's identity.

    The same pixels in any file format give the same hash; a client can recompute it with
    ``hashlib.sha256(x.astype('<f4').tobytes())`` on the (3, S, S) array.
    """
    arr = x.detach().to(torch.float32).contiguous().cpu().numpy().astype("<f4", copy=False)
    return hashlib.sha256(arr.tobytes()).hexdigest()


def _percent(part: int, whole: int) -> str:
    share = 100.0 * part / max(whole, 1)
    return f"{share:.3g}%" if share >= 0.01 else "<0.01%"


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
MAX_ICC_BYTES = PngImagePlugin.MAX_TEXT_CHUNK  # Pillow's cap on a decompressed iCCP: 1 MiB
# cICP (PNG 3rd edition, 11.3.2.6; ITU-T H.273 code points) of sRGB: BT.709 primaries, sRGB
# transfer, RGB (identity) matrix, full range. It outranks iCCP; Pillow does not read it.
SRGB_CICP = bytes((1, 13, 0, 1))


def _icc_too_large(body: bytes) -> bool:
    """Whether an iCCP chunk's profile decompresses to more than :data:`MAX_ICC_BYTES`."""
    compressed = body[body.find(b"\0") + 2 :]  # name, NUL, compression method, zlib data
    inflate = zlib.decompressobj()
    try:
        inflate.decompress(compressed, MAX_ICC_BYTES)
    except zlib.error:
        return False  # a damaged profile: Pillow drops it, viewers ignore it
    return bool(inflate.unconsumed_tail)


def without_text(data: bytes) -> bytes:
    """PNG bytes without their text chunks (tEXt, zTXt, iTXt); other bytes unchanged.

    Nothing here reads PNG text, and Pillow would inflate every compressed chunk (up to 1 MiB
    each, 64 MiB a file) into memory that no image budget counts, or refuse a file with one
    larger chunk that every browser displays. Dropped before Pillow sees them, text costs
    nothing. What stays is bounded by the file's size, plus at most :data:`MAX_ICC_BYTES` for
    an ICC profile; a larger profile is refused (:class:`ImageError` saying so): it could not
    be applied, and ignoring it would certify colours other than the ones a viewer shows. So is
    a ``cICP`` chunk other than sRGB's (:data:`SRGB_CICP`): browsers draw the image in the space
    it names (Display P3, PQ, HLG...), and Pillow does not read it. A
    chunk structure that does not parse is left to Pillow from that point on (its errors)."""
    if not data.startswith(PNG_SIGNATURE):
        return data
    spans: list[tuple[int, int]] = []  # the chunks kept, as (start, end) offsets
    pos = start = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            break
        if kind == b"iCCP" and _icc_too_large(data[pos + 8 : end - 4]):
            raise ImageError(
                f"the embedded ICC colour profile (iCCP chunk) is larger than {MAX_ICC_BYTES} "
                "bytes once decompressed: it cannot be applied here, and the colours a viewer "
                "shows depend on it; convert the image to sRGB and save it without the profile"
            )
        if kind == b"cICP" and data[pos + 8 : end - 4] != SRGB_CICP:
            raise ImageError(
                f"the PNG cICP chunk declares colour code points {tuple(data[pos + 8 : end - 4])} "
                f"(primaries, transfer, matrix, full range) other than sRGB's {tuple(SRGB_CICP)}: "
                "browsers draw it in that space, and this service does not convert it; convert "
                "the image to sRGB"
            )
        if kind in PNG_TEXT_CHUNKS:
            spans.append((start, pos))
            start = end
        pos = end
    if not spans:
        return data  # nothing dropped: no copy
    spans.append((start, len(data)))
    view = memoryview(data)
    return b"".join([PNG_SIGNATURE, *(view[a:b] for a, b in spans)])


def metadata_bytes(img: Image.Image) -> int:
    """Bytes of metadata Pillow holds with an opened image (ICC profile, EXIF, XMP): what an
    image costs beyond its pixels, for the image budget."""
    total = 0
    for key in ("icc_profile", "exif", "xmp", "XML:com.adobe.xmp"):
        value = img.info.get(key)
        if isinstance(value, bytes | str):
            total += len(value)
    return total


def opened(img: Image.Image) -> Image.Image:
    """Facts only an unloaded image still shows; call right after ``Image.open``, before ``load``.

    Pillow decodes a 2- or 4-bit grey PNG to 0..255 but reports its transparent grey (tRNS) in
    the file's 0..3 or 0..15: the key is rescaled here so that it matches the pixels it names.
    A 16-bit RGB PNG's transparent colour names 16-bit samples that Pillow has already cut to 8
    bits, so it can no longer be matched exactly: :class:`ImageError`. Returns ``img``.
    """
    key = img.info.get("transparency")
    tiles = getattr(img, "tile", None)  # an ImageFile's decoder list, until it is loaded
    if img.format != "PNG" or key is None or not tiles:
        return img
    rawmode = tiles[0][3]
    rawmode = rawmode[0] if isinstance(rawmode, tuple) else rawmode
    depth = {"L;2": 2, "L;4": 4}.get(str(rawmode))
    if depth and isinstance(key, int):
        img.info["transparency"] = key * (255 // (2**depth - 1))
    elif str(rawmode).startswith("RGB;16") and isinstance(key, tuple):
        raise ImageError(
            "a 16-bit RGB PNG with a transparent colour (tRNS) cannot be decoded exactly: "
            "save it with an alpha channel or as 8-bit"
        )
    return img


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1-8); 1 without one.

    EXIF only (a JPEG's APP1, a PNG's eXIf, WebP's EXIF chunk, a TIFF's own tag), as browsers
    apply it: Pillow's ``getexif`` also takes an XMP ``tiff:Orientation``, which viewers ignore.
    """
    try:
        if img.format == "PNG" and "exif" not in img.info:
            img.load()  # an eXIf chunk after the image data is read with it
        raw = img.info.get("exif")
        if isinstance(raw, bytes) and raw:
            exif = Image.Exif()
            exif.load(raw)
            value = exif.get(ORIENTATION_TAG, 1)
        else:
            tags = getattr(img, "tag_v2", None)
            value = tags.get(ORIENTATION_TAG, 1) if tags is not None else 1
    except Exception:  # malformed EXIF blocks: treated as no orientation
        return 1
    return value if isinstance(value, int) else 1


def _first_frame(img: Image.Image, steps: list[str], warnings: list[str]) -> None:
    frames = int(getattr(img, "n_frames", 1) or 1)
    if frames > 1 and img.info.get("default_image"):
        raise ImageError(
            "an animated PNG whose still image is not part of its animation: browsers show "
            "the animation, other viewers the still image; upload the one picture to certify"
        )
    if frames > 1:
        img.seek(0)
        steps.append(f"frame 1 of {frames}")
        warnings.append(f"animated or multi-frame image: only frame 1 of {frames} is certified")


SRGB_GAMMA = 1 / 2.2  # the gAMA of sRGB (45455 in the chunk's units of 1/100000)
GAMMA_TOLERANCE = 0.01  # a gAMA within 1% of SRGB_GAMMA is taken as sRGB, as viewers do
# cHRM of sRGB (PNG spec, 11.3.3.5): white, red, green, blue (x, y), and how far a file's may lie
SRGB_CHROMATICITY = (0.3127, 0.329, 0.64, 0.33, 0.3, 0.6, 0.15, 0.06)
CHROMATICITY_TOLERANCE = 0.005
Transfer = Callable[[np.ndarray], np.ndarray]  # [0, 1] samples -> [0, 1] sRGB samples


def _srgb_encode(linear: np.ndarray) -> np.ndarray:
    """Linear light in [0, 1] -> sRGB-encoded values (IEC 61966-2-1, the piecewise curve)."""
    linear = np.clip(linear, 0.0, 1.0)
    high = 1.055 * np.power(linear, 1 / 2.4) - 0.055
    return np.where(linear <= 0.0031308, 12.92 * linear, high)


def _gamma_to_srgb(gamma: float, unit: np.ndarray) -> np.ndarray:
    """A PNG sample ``v`` in [0, 1] with file gamma ``gamma`` -> sRGB: ``v ** (1 / gamma)`` is
    the light it encodes (PNG spec, 12.2), which is then sRGB-encoded (what Chromium and
    Firefox draw for a gAMA chunk without iCCP or sRGB)."""
    light = np.power(unit.astype(np.float64), 1.0 / gamma)
    return _srgb_encode(light).astype(np.float32)


def _icc_name(profile: ImageCmsProfile) -> str:
    from PIL import ImageCms

    try:
        return str(ImageCms.getProfileDescription(profile)).strip() or "unnamed"
    except Exception:
        return "unnamed"


ICC_SPACES = {"RGB": ("P", "PA", "RGB", "RGBA", "RGBa", "RGBX"), "GRAY": GREY, "CMYK": ("CMYK",)}


SRGB_PROBE_LEVELS = np.unique(np.r_[np.arange(0, 256, 15), 255]).astype(np.uint8)


def _acts_as_srgb(profile: ImageCmsProfile, space: str) -> bool:
    """Whether converting from ``profile`` to sRGB (relative colorimetric) moves no 8-bit value
    by more than 1 level: a grid of 18^3 colours (RGB) or every grey level (GRAY) is converted
    and compared. Decided by what the profile does, not by its name: a "Linear sRGB" profile
    has sRGB's primaries but linear curves, and a browser draws it much lighter."""
    from PIL import ImageCms

    if space == "GRAY":
        probe = np.arange(256, dtype=np.uint8)[None, :]
        want = np.repeat(probe[..., None], 3, axis=2)
        img = Image.fromarray(probe, "L")
    else:
        r, g, b = np.meshgrid(SRGB_PROBE_LEVELS, SRGB_PROBE_LEVELS, SRGB_PROBE_LEVELS)
        want = np.stack([r.ravel(), g.ravel(), b.ravel()], axis=1)[None]
        img = Image.fromarray(np.ascontiguousarray(want), "RGB")
    try:
        out = ImageCms.profileToProfile(
            img,
            profile,
            ImageCms.createProfile("sRGB"),
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
            outputMode="RGB",
        )
    except Exception:  # a profile LittleCMS cannot use: _apply_icc's conversion says so
        return False
    assert out is not None
    diff = np.abs(np.asarray(out, dtype=np.int16) - want.astype(np.int16))
    return int(diff.max()) <= 1


def _apply_icc(img: Image.Image, data: bytes, steps: list[str], warnings: list[str]) -> Image.Image:
    """Convert ``img`` from its embedded ICC profile to sRGB with LittleCMS (Pillow's
    ``ImageCms``, perceptual intent, alpha kept). A profile that cannot be read or does not
    match the image's colour space is ignored, as browsers ignore it (with a warning); one
    that acts as sRGB (:func:`_acts_as_srgb`, whatever its name) leaves the pixels unchanged."""
    from PIL import ImageCms

    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(data))
    except Exception:
        warnings.append(
            "embedded ICC colour profile unreadable: not applied, pixel values taken as sRGB"
        )
        return img
    name = _icc_name(profile)
    space = str(profile.profile.xcolor_space).strip().upper()
    if space in ("RGB", "GRAY") and _acts_as_srgb(profile, space):
        steps.append(f"ICC profile {name!r} taken as sRGB (it maps every value within 1 level)")
        return img
    if img.mode in HIGH_BIT and space == "GRAY":
        raise ImageError(
            f"a {img.mode} image with an embedded ICC colour profile ({name!r}): colour "
            "profiles are applied to 8-bit images only; convert it to sRGB before uploading"
        )
    if img.mode not in ICC_SPACES.get(space, ()):
        warnings.append(
            f"embedded ICC colour profile {name!r} ({space}) does not fit the {img.mode} image: "
            "not applied, pixel values taken as sRGB"
        )
        return img
    grey = space == "GRAY"
    alpha = None
    if img.mode in WITH_ALPHA or "transparency" in img.info:
        with_alpha = img.convert("LA" if grey else "RGBA")
        alpha = with_alpha.getchannel("A")
        img = with_alpha.convert("L" if grey else "RGB")
    elif img.mode not in ("L", "RGB", "CMYK"):
        img = img.convert("L" if grey else "RGB")
    srgb = ImageCms.createProfile("sRGB")
    out = ImageCms.profileToProfile(img, profile, srgb, outputMode="RGB")
    assert out is not None
    if alpha is not None:
        out.putalpha(alpha)
    steps.append(f"ICC profile {name!r} ({space}) converted to sRGB (LittleCMS, perceptual)")
    warnings.append(
        f"embedded ICC colour profile {name!r} applied: pixel values converted to sRGB as a "
        "browser shows them"
    )
    return out


def _colour(
    img: Image.Image, steps: list[str], warnings: list[str]
) -> tuple[Image.Image, Transfer | None]:
    """Colour metadata -> sRGB as a browser draws it: (the image, converted when an ICC profile
    applies; a transfer to apply to its samples for a gAMA, else None).

    Precedence as in the PNG specification (3rd edition, 4.3) and Chromium: an ICC profile
    (iCCP, or a JPEG's/WebP's) first, then an ``sRGB`` chunk (no change), then ``cHRM`` and
    ``gAMA``. A gAMA within :data:`GAMMA_TOLERANCE` of 1/2.2 (45455) is sRGB (no change); any
    other is converted (:func:`_gamma_to_srgb`); a gAMA of 0 is invalid and ignored (as
    libpng does), with a warning. A cHRM other than sRGB's primaries and white point is refused:
    gamut conversion is not done here."""
    info = img.info
    profile = info.get("icc_profile")
    if profile and img.mode != "LAB":  # Pillow converts CIELAB to sRGB colorimetrically
        return _apply_icc(img, profile, steps, warnings), None
    if "srgb" in info:
        steps.append("sRGB chunk: values taken as sRGB")
        return img, None
    chrm = info.get("chromaticity")
    if chrm is not None:
        near = all(
            abs(float(a) - b) <= CHROMATICITY_TOLERANCE
            for a, b in zip(chrm, SRGB_CHROMATICITY, strict=False)
        )
        if not near or len(chrm) != len(SRGB_CHROMATICITY):
            shown = ", ".join(f"{float(v):.4g}" for v in chrm)
            raise ImageError(
                f"the PNG cHRM chunk declares primaries and white point ({shown}) other than "
                "sRGB's: this service does not convert between gamuts; convert the image to "
                "sRGB (or remove cHRM and gAMA if its values already are sRGB)"
            )
    gamma = info.get("gamma")
    if gamma is None:
        if chrm is not None:
            steps.append("cHRM: sRGB primaries, values taken as sRGB")
        return img, None
    gamma = float(gamma)
    if not (np.isfinite(gamma) and gamma > 0):
        warnings.append(f"invalid PNG gAMA {gamma:g} ignored: pixel values taken as sRGB")
        return img, None
    if abs(gamma / SRGB_GAMMA - 1) <= GAMMA_TOLERANCE:
        steps.append(f"gAMA {gamma:g} taken as sRGB")
        return img, None
    steps.append(f"gAMA {gamma:g}: samples v -> sRGB encoding of v^(1/{gamma:g})")
    warnings.append(
        f"PNG gAMA {gamma:g} (sRGB's is 0.45455): pixel values converted to sRGB as a "
        "browser shows them"
    )
    return img, partial(_gamma_to_srgb, gamma)


def _lut(img: Image.Image, transfer: Transfer) -> Image.Image:
    """``transfer`` applied to the colour bands of an 8-bit L, LA, RGB or RGBA image (alpha
    kept), as Pillow's 256-entry lookup tables; results rounded to 8 bits, as a browser draws."""
    levels = np.arange(256, dtype=np.float32) / np.float32(255)
    table = [int(v) for v in np.round(transfer(levels) * 255).clip(0, 255)]
    bands = img.getbands()
    lut: list[int] = []
    for band in bands:
        lut += list(range(256)) if band == "A" else table
    return img.point(lut)


def _high_bit(
    img: Image.Image, steps: list[str], warnings: list[str], transfer: Transfer | None
) -> Image.Image:
    """I;16*, I or F -> one 'F' plane in [0, 1] (``transfer`` applied: a gAMA), transparency
    composited on white (1.0)."""
    arr = np.asarray(img)
    if img.mode in SIXTEEN_BIT:
        unit = arr.astype(np.float32) / np.float32(65535)
        steps.append("16-bit grey / 65535")
    elif img.mode == "I":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 65535:
            raise ImageError(
                f"32-bit integer image with values {lo}..{hi}: only 0..65535 (16-bit samples) "
                "has a standard display; save it as 8- or 16-bit"
            )
        unit = arr.astype(np.float32) / np.float32(65535)
        steps.append("32-bit integer grey read as 16-bit / 65535")
    else:
        unit = arr.astype(np.float32)
        if not np.isfinite(unit).all():
            raise ImageError("float image contains NaN or infinite values")
        outside = int(np.count_nonzero((unit < 0) | (unit > 1)))
        steps.append("32-bit float grey taken as [0,1]")
        if outside:
            unit = np.clip(unit, 0.0, 1.0)
            steps.append(f"clip {outside} float samples to [0,1]")
            share = _percent(outside, unit.size)
            warnings.append(f"{share} of float samples outside [0,1] clipped")
    if transfer is not None:
        unit = transfer(unit)
    key = img.info.get("transparency")
    if isinstance(key, int | float) and not isinstance(key, bool):
        clear = arr == key
        count = int(np.count_nonzero(clear))
        if count:
            unit = np.where(clear, np.float32(1.0), unit)
            steps.append(f"alpha: {ALPHA_POLICY} (transparent value {key})")
            warnings.append(
                f"{_percent(count, clear.size)} of pixels are transparent: certified as "
                "composited on white"
            )
    return Image.fromarray(np.ascontiguousarray(unit, dtype=np.float32), mode="F")


def _eight_bit(
    img: Image.Image, steps: list[str], warnings: list[str], transfer: Transfer | None
) -> Image.Image:
    """Every other mode -> 'L' or 'RGB' (8-bit; ``transfer`` applied to the colour, as for a
    gAMA), transparency composited on white (after the colour conversion, as browsers do)."""
    mode = img.mode
    if mode not in SUPPORTED_MODES:
        raise ImageError(f"unsupported image mode {mode!r}")
    grey = mode in GREY
    if mode not in WITH_ALPHA and "transparency" not in img.info:
        if mode == "1":
            steps.append("1-bit -> 0 or 1")
        elif mode == "L":
            steps.append("8-bit grey / 255")
        elif mode == "RGB":
            steps.append("8-bit RGB / 255")
        else:
            steps.append(f"{mode} -> 8-bit RGB / 255")
        target = "L" if grey else "RGB"
        out = img if mode == target else img.convert(target)
        return out if transfer is None else _lut(out, transfer)
    if mode == "1":
        img = img.convert("L")  # keeps the transparent value
    rgba = img.convert("LA" if grey else "RGBA")
    if transfer is not None:
        rgba = _lut(rgba, transfer)
    alpha = rgba.getchannel("A")
    described = f"{mode} with transparency" if mode not in WITH_ALPHA else mode
    if alpha.getextrema()[0] == 255:
        steps.append(f"{described}: alpha fully opaque, removed")
        out = rgba.convert("L" if grey else "RGB")
    else:
        count = int(np.count_nonzero(np.asarray(alpha) < 255))
        over = Image.alpha_composite(
            Image.new("RGBA", img.size, (*ALPHA_BACKGROUND, 255)), rgba.convert("RGBA")
        )
        out = over.convert("L" if grey else "RGB")
        steps.append(f"{described}: alpha: {ALPHA_POLICY}")
        warnings.append(
            f"{_percent(count, alpha.width * alpha.height)} of pixels are (partly) transparent: "
            "certified as composited on white"
        )
    steps.append("8-bit grey / 255" if grey else "8-bit RGB / 255")
    return out


def _factor(x: float) -> str:
    """A scale factor for a warning: 2, 1.5, 1.14 (3 significant digits, never rounded to 1)."""
    return f"{x:.3g}" if f"{x:.3g}" != "1" else f"{x:.6g}"


def _square(img: Image.Image, size: int, steps: list[str], warnings: list[str]) -> Image.Image:
    """The centred min(w, h) square resized straight to size x size (bicubic, box in source)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    if side == size:
        if (w, h) != (size, size):
            steps.append(f"centre crop {w}x{h} -> {size}x{size} at ({left}, {top})")
            img = img.crop(box)
        else:
            steps.append(f"no resize: already {size}x{size}")
    else:
        steps.append(
            f"bicubic resize of the centre square {box} of {w}x{h} straight to {size}x{size}"
        )
        img = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    kept = side * side / (w * h)
    if kept < CROP_WARNING:
        warnings.append(
            f"the centre crop keeps only {_percent(side * side, w * h)} of the image "
            f"({side}x{side} of {w}x{h})"
        )
    factor = side / size
    if factor > DOWNSCALE_WARNING:
        warnings.append(f"downscaled {factor:.0f}x to the model's {size}x{size} input")
    elif factor < 1:
        warnings.append(
            f"upscaled {_factor(size / side)}x to the model's {size}x{size} input (from "
            f"{side}x{side}): the radius is measured in the upsampled space, not in the image's "
            "own pixels; radii of models with different input sizes are not comparable"
        )
    return img


def _displayed(img: Image.Image, steps: list[str], warnings: list[str]) -> Image.Image:
    """Steps 1-4: the image as a viewer shows it, as one 'L', 'RGB' or 'F' (grey) image."""
    _first_frame(img, steps, warnings)
    declared = _orientation(img)
    img.load()  # Pillow applies a TIFF's orientation while loading
    if _orientation(img) in range(2, 9):
        img = ImageOps.exif_transpose(img)
    if declared in range(2, 9):
        steps.append(f"exif_transpose({declared})")
    elif declared != 1:
        warnings.append(f"invalid EXIF orientation {declared} ignored")
    img, transfer = _colour(img, steps, warnings)
    if img.mode in HIGH_BIT:
        return _high_bit(img, steps, warnings, transfer)
    return _eight_bit(img, steps, warnings, transfer)


def _converted(img: Image.Image, convert: Callable[[Image.Image], T]) -> T:
    """Run ``convert`` on ``img``, turning decoder errors into :class:`ImageError`."""
    try:
        return convert(img)
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageError(f"unreadable or corrupt {img.format or ''} image: {exc}") from exc


def preprocess_image(img: Image.Image, input_size: int) -> Preprocessed:
    """A decoded PIL image -> :class:`Preprocessed` ((3, S, S) float32 tensor and its record).

    Raises :class:`ImageError` for pixel data that cannot be decoded or has no defined display
    (truncated files, unsupported modes, NaN floats, 32-bit integers beyond 16 bits).
    """
    if input_size < 1:
        raise ValueError(f"input size must be at least 1, got {input_size}")
    steps: list[str] = [f"decode {img.format or 'image'} {img.mode} {img.width}x{img.height}"]
    warnings: list[str] = []
    plane = _converted(img, lambda im: _displayed(im, steps, warnings))
    size = plane.size
    square = _converted(plane, lambda im: _square(im, input_size, steps, warnings))
    arr = np.asarray(square, dtype=np.float32)
    # 'F': clip the bicubic overshoot (8-bit resizing clips by itself) and turn -0.0 into 0.0.
    arr = np.clip(arr, 0.0, 1.0) + np.float32(0.0) if square.mode == "F" else arr / 255.0
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
        steps.append("grey -> 3 equal channels")
    tensor = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32))
    return Preprocessed(tensor, size, input_size / min(size), steps, warnings)


def displayed_rgb(img: Image.Image) -> Image.Image:
    """Steps 1-4 only, as an 8-bit RGB image: what training augmentations start from."""
    plane = _converted(img, lambda im: _displayed(im, [], []))
    if plane.mode == "F":
        plane = Image.fromarray(np.round(np.asarray(plane) * 255).astype(np.uint8), mode="L")
    return plane.convert("RGB")


def preprocess(img: Image.Image, input_size: int) -> Tensor:
    """A decoded PIL image -> the (3, S, S) float32 tensor of :func:`preprocess_image`."""
    return preprocess_image(img, input_size).tensor


def open_file(path: str | Path, convert: Callable[[Image.Image], T]) -> T:
    """``convert(image)`` on an image file; :class:`ImageError` naming the file if unreadable."""
    name = Path(path).name
    try:
        with open(path, "rb") as f:
            png = f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
        source = io.BytesIO(without_text(Path(path).read_bytes())) if png else path
        with Image.open(source) as img:
            return convert(opened(img))
    except ImageError as exc:
        raise ImageError(f"{name}: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not a readable image") from exc
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name}: unreadable image: {exc}") from exc


def read_image(path: str | Path, input_size: int) -> Preprocessed:
    """An image file -> :class:`Preprocessed`; :class:`ImageError` naming the file if unreadable."""
    result: Preprocessed = open_file(path, lambda img: preprocess_image(img, input_size))
    return result


def load_image(path: str | Path, input_size: int) -> Tensor:
    """An image file -> its (3, S, S) float32 tensor (see :func:`read_image`)."""
    return read_image(path, input_size).tensor
