"""Request bodies and uploaded files: per-route body caps while they stream, reading an image
upload, and saving a checkpoint upload under a server-chosen name.

- Request bodies are capped per route *while they stream* (:class:`BodyLimit`): a declared
  ``Content-Length`` over the cap is refused before reading, and a body that grows past it is
  cut off, both with 413.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from fastapi import UploadFile
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from domain.errors import ServiceError

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
