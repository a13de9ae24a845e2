"""The one image conversion: a decoded image -> the tensor a certificate's radius is about.

:func:`preprocess_image` is used by the API (``domain/images.py``), the CLI and the datasets alike.
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
   clipped with a warning, NaN or infinity refused. Embedded ICC profiles are not applied: the
   stored values are taken as sRGB (a warning names any other profile).
4. Transparency (RGBA, LA, PA, premultiplied RGBa/La, P, L, 1, RGB and I;16 with a transparent
   colour): composited onto **white** (:data:`ALPHA_BACKGROUND`), as a browser shows it on a
   default page; an alpha channel that is fully opaque is removed unchanged. Either way the
   step is recorded; never dropped silently.
5. The centred square of side ``min(w, h)`` (integer offsets in source pixels) is resized
   straight to S x S with Pillow's bicubic filter (``Image.resize(size, box=...)``), so memory
   stays O(S^2 + decoded image) whatever the aspect ratio. At S x S already: no resampling.
6. Grey images become 3 equal channels; float32; sha256 of those bytes is the input's identity.

Warnings flag inputs far from the model's domain: downscaled more than
:data:`DOWNSCALE_WARNING` x or upscaled more than :data:`UPSCALE_WARNING` x, a centre crop that
keeps less than :data:`CROP_WARNING` of the image, transparency, clipped floats, animations and
foreign colour profiles.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

ALPHA_BACKGROUND = (255, 255, 255)
ALPHA_POLICY = "composite on white"
DOWNSCALE_WARNING = 8.0
UPSCALE_WARNING = 4.0
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


def _icc(img: Image.Image, warnings: list[str]) -> None:
    profile = img.info.get("icc_profile")
    if not profile or img.mode == "LAB":  # Pillow converts CIELAB to sRGB colorimetrically
        return
    try:
        from PIL import ImageCms

        name = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(profile)))
        name = name.strip()
    except Exception:
        name = "unreadable"
    if "srgb" not in name.lower().replace(" ", ""):
        warnings.append(
            f"embedded ICC colour profile {name!r} not applied: pixel values taken as sRGB"
        )


def _high_bit(img: Image.Image, steps: list[str], warnings: list[str]) -> Image.Image:
    """I;16*, I or F -> one 'F' plane in [0, 1], transparency composited on white (1.0)."""
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


def _eight_bit(img: Image.Image, steps: list[str], warnings: list[str]) -> Image.Image:
    """Every other mode -> 'L' or 'RGB' (8-bit), transparency composited on white."""
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
        return img if mode == target else img.convert(target)
    if mode == "1":
        img = img.convert("L")  # keeps the transparent value
    rgba = img.convert("LA" if grey else "RGBA")
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
    elif 1 / factor > UPSCALE_WARNING:
        warnings.append(f"upscaled {1 / factor:.0f}x to the model's {size}x{size} input")
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
    _icc(img, warnings)
    if img.mode in HIGH_BIT:
        return _high_bit(img, steps, warnings)
    return _eight_bit(img, steps, warnings)


def _converted(img: Image.Image, convert: Any) -> Any:
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


def open_file(path: str | Path, convert: Any) -> Any:
    """``convert(image)`` on an image file; :class:`ImageError` naming the file if unreadable."""
    name = Path(path).name
    try:
        with Image.open(path) as img:
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
