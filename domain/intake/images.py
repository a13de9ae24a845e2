"""Client-sent image bytes -> the tensor a certificate is about.

- Images are opened by Pillow restricted to :data:`IMAGE_FORMATS` (the bytes decide, never the
  client's filename or content type), the pixel count is checked from the header before any
  decoding, and truncated or corrupt files are refused with 422.
- PNG text chunks are dropped before Pillow reads them (``models.images.without_text``: they
  never change the picture and Pillow would inflate them outside any budget); the metadata
  that stays (ICC profile, EXIF, XMP) counts in the image budget.
- The accepted image is converted by ``models.images.preprocess_image``, the one conversion the
  CLI and the datasets use too; its record (steps, original size, scale, warnings) goes into
  the job and its certificate, and the sha256 of the resulting tensor is the input's identity.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from torch import Tensor

from domain.errors import ServiceError
from models.images import (
    ImageError,
    Preprocessed,
    metadata_bytes,
    opened,
    preprocess_image,
    without_text,
)

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # the names of IMAGE_FORMATS' files


@dataclass
class DecodedImage:
    """An accepted upload: the preprocessed input (tensor and record) and facts about the bytes."""

    input: Preprocessed
    sha256: str  # of the uploaded bytes
    format: str
    size: tuple[int, int]

    @property
    def tensor(self) -> Tensor:
        return self.input.tensor

    @property
    def tensor_sha256(self) -> str:
        return self.input.tensor_sha256


class PixelBudget:
    """How many pixels one process decodes and converts at once. An image of the maximum size
    takes about 20 bytes of memory per pixel while it is converted (a 170 KB PNG of 6,300 x
    6,300 RGBA pixels: about 800 MB), so 40 request threads decoding such images together could
    need 32 GB. An image of ``SMALL`` pixels or fewer takes nothing from the budget (the common
    case costs one comparison); a larger one waits until its pixels fit. The budget is twice
    the largest image the settings accept, so two of the largest decode at once. Metadata kept
    with an image (an ICC profile of at most 1 MiB, EXIF, XMP: PNG text is dropped unread by
    ``models.images.without_text``) counts as :data:`BYTES_PER_PIXEL` bytes a pixel."""

    SMALL = 1_000_000

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self.in_use = 0  # pixels being decoded now (read by the tests)

    @contextlib.contextmanager
    def taken(self, pixels: int, max_pixels: int) -> Iterator[None]:
        """Hold ``pixels`` of a budget of ``2 * max_pixels`` (blocking until they fit)."""
        if pixels <= self.SMALL:
            yield
            return
        with self._lock:
            while self.in_use and self.in_use + pixels > 2 * max_pixels:
                self._lock.wait()
            self.in_use += pixels
        try:
            yield
        finally:
            with self._lock:
                self.in_use -= pixels
                self._lock.notify_all()


pixel_budget = PixelBudget()
BYTES_PER_PIXEL = 20  # what a pixel costs in conversion: metadata bytes count as 1/20 pixel


def _opened(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header read and checked (format, pixel count); nothing decoded yet."""
    if not data:
        raise ServiceError(422, "the image upload is empty")
    try:
        data = without_text(data)  # PNG text would be inflated outside any budget
    except ImageError as exc:
        raise ServiceError(422, str(exc)) from exc
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ServiceError(413, f"image too large to decode safely: {exc}") from exc
        except UnidentifiedImageError as exc:
            raise ServiceError(
                415, f"not a supported image: accepted formats are {', '.join(IMAGE_FORMATS)}"
            ) from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise ServiceError(422, f"unreadable image: {exc}") from exc
    w, h = img.size
    if w < 1 or h < 1:
        raise ServiceError(422, f"image has no pixels ({w} x {h})")
    if w * h > max_pixels:
        raise ServiceError(
            413, f"image of {w} x {h} = {w * h} pixels exceeds the limit of {max_pixels}"
        )
    return img


def _load(img: Image.Image) -> Image.Image:
    """Decode the pixels, refusing damaged files and bombs with clear errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened(img)
            img.load()
        except ImageError as exc:
            raise ServiceError(422, f"could not convert the image: {exc}") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ServiceError(413, f"image too large to decode safely: {exc}") from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ServiceError(422, f"truncated or corrupt {img.format} image: {exc}") from exc
    return img


def decode_image(data: bytes, input_size: int, max_pixels: int) -> DecodedImage:
    """Bytes of an upload -> the (3, S, S) tensor the certificate will refer to, with its record."""
    img = _opened(data, max_pixels)
    cost = img.size[0] * img.size[1] + metadata_bytes(img) // BYTES_PER_PIXEL
    with pixel_budget.taken(cost, max_pixels):  # the memory-heavy part
        _load(img)
        try:
            done = preprocess_image(img, input_size)
        except (ImageError, OSError, ValueError) as exc:
            raise ServiceError(422, f"could not convert the image: {exc}") from exc
    return DecodedImage(done, hashlib.sha256(data).hexdigest(), str(img.format), img.size)
