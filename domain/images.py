"""Client-sent image bytes -> the tensor a certificate is about.

- Images are opened by Pillow restricted to :data:`IMAGE_FORMATS` (the bytes decide, never the
  client's filename or content type), the pixel count is checked from the header before any
  decoding, and truncated or corrupt files are refused with 422.
- The accepted image is converted by ``models.images.preprocess_image``, the one conversion the
  CLI and the datasets use too; its record (steps, original size, scale, warnings) goes into
  the job and its certificate, and the sha256 of the resulting tensor is the input's identity.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError
from torch import Tensor

from domain.errors import ServiceError
from models.images import ImageError, Preprocessed, opened, preprocess_image

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


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


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data`` as PNG, JPEG or WebP, refusing bombs and damaged files with clear errors."""
    if not data:
        raise ServiceError(422, "the image upload is empty")
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
    img = open_image(data, max_pixels)
    try:
        done = preprocess_image(img, input_size)
    except (ImageError, OSError, ValueError) as exc:
        raise ServiceError(422, f"could not convert the image: {exc}") from exc
    return DecodedImage(done, hashlib.sha256(data).hexdigest(), str(img.format), img.size)
