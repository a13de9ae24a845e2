"""Everything that touches client-sent bytes: body-size caps, image decoding, file uploads.

- Request bodies are capped per route *while they stream* (:class:`BodyLimit`): a declared
  ``Content-Length`` over the cap is refused before reading, and a body that grows past it is
  cut off, both with 413.
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
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import UploadFile
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import Tensor

from app.errors import ServiceError
from models.images import Preprocessed

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MULTIPART_SLACK = 64 * 1024  # form fields and part headers around an upload
CHUNK = 1 << 20

LimitFor = Callable[[str, str], int]


class BodyLimit:
    """ASGI middleware capping request bodies; ``limit_for(method, path)`` gives the cap."""

    def __init__(self, app: ASGIApp, limit_for: LimitFor):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        message = f"request body larger than the limit of {limit} bytes"
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                too_big = False
            if too_big:
                await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > limit:
                    # An HTTPException passes through FastAPI's body parsing unchanged and is
                    # answered by the JSON handler in app.errors.
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, limited, send)


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
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ServiceError(413, f"image too large to decode safely: {exc}") from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ServiceError(422, f"truncated or corrupt {img.format} image: {exc}") from exc
    return img


def decode_image(data: bytes, input_size: int, max_pixels: int) -> DecodedImage:
    """Bytes of an upload -> the (3, S, S) tensor the certificate will refer to, with its record."""
    from models.images import ImageError, preprocess_image

    img = open_image(data, max_pixels)
    try:
        done = preprocess_image(img, input_size)
    except (ImageError, OSError, ValueError) as exc:
        raise ServiceError(422, f"could not convert the image: {exc}") from exc
    return DecodedImage(done, hashlib.sha256(data).hexdigest(), str(img.format), img.size)


def read_upload(upload: UploadFile, limit: int, what: str = "upload") -> bytes:
    """The whole upload, refusing more than ``limit`` bytes (the body cap already applies)."""
    upload.file.seek(0)
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise ServiceError(413, f"{what} larger than the limit of {limit} bytes")
    return data


def save_upload(upload: UploadFile, folder: Path, limit: int) -> tuple[Path, str]:
    """Stream an upload into ``folder`` under a server-chosen name; returns (path, sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            upload.file.seek(0)
            while chunk := upload.file.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ServiceError(413, f"checkpoint larger than the limit of {limit} bytes")
                h.update(chunk)
                out.write(chunk)
        if size == 0:
            raise ServiceError(422, "the checkpoint upload is empty")
        digest = h.hexdigest()
        final = folder / f"{digest}.ckpt"
        os.replace(tmp, final)
        return final, digest
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
