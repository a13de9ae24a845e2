"""A corpus of hostile requests to the service: each one must be answered with a 4xx, never a
5xx, and leave nothing behind. Used by tests/test_service_hostile.py.

Every entry is (name, expected status, method, path, who, request keyword arguments) where
``who`` is "alice" (a client key), "admin", "bob", "none" (no key) or a literal key.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

VALID_FORM = {"sigma": "0.25", "n0": "20", "n": "200"}


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_declaring(width: int, height: int, extra: bytes = b"") -> bytes:
    """A PNG whose header declares ``width`` x ``height`` with almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + extra
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


def png_text_bomb() -> bytes:
    """An 8x8 PNG with a zTXt chunk inflating to 64 MB."""
    bomb = zlib.compress(b"\x00" * (64 << 20), 9)
    return png_declaring(8, 8, _chunk(b"zTXt", b"comment\x00\x00" + bomb))


def gif_bomb() -> bytes:
    """A GIF declaring a 65535 x 65535 screen and frame (4.3 G pixels) in 30 bytes."""
    screen = struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00"
    frame = b"," + struct.pack("<HHHH", 0, 0, 65535, 65535) + b"\x00"
    return b"GIF89a" + screen + frame + b"\x02\x02\x4c\x01\x00;"


def _saved(fmt: str, size: tuple[int, int] = (8, 8), **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 30, 200)).save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(_saved("JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def webp_declaring_max() -> bytes:
    """A lossless WebP whose header declares 16384 x 16384 (268 M pixels)."""
    data = bytearray(_saved("WEBP", lossless=True))
    at = data.index(b"VP8L") + 9
    data[at : at + 4] = struct.pack("<I", 16383 | (16383 << 14))
    return bytes(data)


def corrupt_png_crc(png: bytes) -> bytes:
    data = bytearray(png)
    idat = data.index(b"IDAT")
    data[idat + 6] ^= 0xFF  # flip a byte of the compressed pixels: CRC mismatch, bad zlib
    return bytes(data)


class Exploit:
    """Unpickling this runs print(): a checkpoint that would execute code."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("PWNED-BY-PICKLE",))


def torch_pickle_exploit() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(1)}, "args": Exploit()}, buf)
    return buf.getvalue()


@dataclass
class Case:
    name: str
    expect: int
    method: str
    path: str
    who: str = "alice"
    kw: dict[str, Any] = field(default_factory=dict)


def image_case(name: str, expect: int, data: bytes, filename: str = "x.png", **form: str) -> Case:
    return Case(
        name,
        expect,
        "post",
        "/certify",
        kw={
            "files": {"image": (filename, data, "image/png")},
            "data": {**VALID_FORM, **form},
        },
    )


def corpus(good_png: bytes, other_job_url: str) -> list[Case]:
    """The hostile requests. ``good_png`` is a valid digit (so parameter cases fail on the
    parameter alone); ``other_job_url`` is a job of another client (bob)."""
    jpeg = _saved("JPEG", (64, 64))
    cases = [
        # ---- uploads
        image_case("empty file", 422, b""),
        image_case("plain text", 415, b"hello, this is not an image\n"),
        image_case(
            "SVG with script",
            415,
            b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>",
            "x.svg",
        ),
        image_case("GIF bomb (65535 x 65535)", 415, gif_bomb(), "bomb.gif"),
        image_case("small valid GIF (not allowed)", 415, _saved("GIF")),
        image_case("BMP (not allowed)", 415, _saved("BMP")),
        image_case("TIFF (not allowed)", 415, _saved("TIFF")),
        image_case("PDF", 415, b"%PDF-1.7\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF"),
        image_case("PNG declaring 100000 x 100000", 413, png_declaring(100_000, 100_000)),
        image_case("PNG declaring 7000 x 7000 (> pixel cap)", 413, png_declaring(7000, 7000)),
        image_case("PNG declaring 2^31-1 x 1", 413, png_declaring(2**31 - 1, 1)),
        image_case("PNG declaring 0 x 0", 415, png_declaring(0, 0)),
        image_case("PNG zTXt decompression bomb", 422, png_text_bomb()),
        image_case("JPEG declaring 65000 x 65000", 413, jpeg_declaring(65000, 65000)),
        image_case("WebP declaring 16384 x 16384", 413, webp_declaring_max()),
        image_case("truncated PNG", 422, good_png[: len(good_png) // 2]),
        image_case("truncated JPEG", 422, jpeg[: len(jpeg) // 2]),
        image_case("PNG with corrupted pixel data", 422, corrupt_png_crc(good_png)),
        image_case("PNG signature only", 415, b"\x89PNG\r\n\x1a\n"),
        image_case(
            "path traversal filename",
            415,
            b"not an image",
            "../../../../etc/passwd",
        ),
        image_case("unicode filename", 415, b"GIF87a", "\u6570\u5b57\U0001f600\u202e.png"),
        Case(
            "50 MB body",
            413,
            "post",
            "/certify",
            kw={
                "content": b"\x00" * (50 << 20),
                "headers": {"Content-Type": "multipart/form-data; boundary=x"},
            },
        ),
        Case(
            "image sent as a text field",
            422,
            "post",
            "/certify",
            kw={"data": {**VALID_FORM, "image": "iVBORw0KGgo="}},
        ),
        Case("no image at all", 422, "post", "/certify", kw={"data": VALID_FORM}),
        Case(
            "JSON body instead of multipart",
            422,
            "post",
            "/certify",
            kw={"json": {"image": "x", **VALID_FORM}},
        ),
        Case(
            "broken multipart",
            400,
            "post",
            "/certify",
            kw={
                "content": b'--nope\r\nContent-Disposition: form-data; name="image"\r\n\r\nab',
                "headers": {"Content-Type": "multipart/form-data; boundary=x"},
            },
        ),
        # ---- parameters (valid image, one bad field each)
        *(
            image_case(f"bad parameter {k}={v!r}", 422, good_png, **{k: v})
            for k, v in [
                ("sigma", "nan"),
                ("sigma", "inf"),
                ("sigma", "-0.25"),
                ("sigma", "0"),
                ("sigma", "1e400"),
                ("sigma", "a quarter"),
                ("sigma", "0.3"),  # no model trained for it
                ("alpha", "0"),
                ("alpha", "0.5"),
                ("alpha", "nan"),
                ("alpha", "-1"),
                ("n", "0"),
                ("n", "-5"),
                ("n", "1.5"),
                ("n", "1000000000000"),
                ("n", "NaN"),
                ("n0", "0"),
                ("n0", "99999999"),
                ("seed", "-1"),
                ("seed", str(2**63)),
                ("seed", "0x10"),
                ("mode", "CERTIFY"),
                ("mode", "certify; DROP TABLE jobs"),
                ("model", "../../etc/passwd"),
                ("model", "\u6a21\u578b-\u00e9\u2603"),
                ("model", "a\x00b"),
                ("model", "x" * 20_000),
            ]
        ),
        # ---- keys, ownership, admin
        Case("no API key", 401, "get", "/jobs", who="none"),
        Case("unknown API key", 401, "get", "/jobs", who="dmae_forged"),
        Case("10 kB API key", 401, "get", "/jobs", who="k" * 10_000),
        Case("another client's job", 404, "get", other_job_url),
        Case("cancel another client's job", 404, "delete", other_job_url),
        Case("job id with traversal", 404, "get", "/jobs/..%2F..%2Fetc%2Fpasswd"),
        Case("page size -1", 422, "get", "/jobs?limit=-1"),
        Case("page offset 10^30", 422, "get", "/jobs?offset=" + "1" + "0" * 30),
        Case("unknown status filter", 422, "get", "/jobs?status=pwned"),
        Case("admin list with a client key", 403, "get", "/admin/models"),
        Case(
            "admin registration with a client key",
            403,
            "post",
            "/admin/models",
            kw={"data": {"path": "tiny.safetensors", "name": "mine"}},
        ),
        Case("admin training with a client key", 403, "get", "/admin/training"),
        # ---- admin inputs (admin key)
        *(
            Case(
                f"checkpoint path {p!r}",
                422,
                "post",
                "/admin/models",
                who="admin",
                kw={"data": {"path": p, "name": "evil"}},
            )
            for p in (
                "../../../../etc/passwd",
                "/etc/passwd",
                "../checkpoints/../../outside.safetensors",
                "evil.pth",  # a pickle that runs code, inside the folder
                "link.safetensors",  # a symlink leading outside the folder
                "nul\x00byte.safetensors",
            )
        ),
        Case(
            "malicious pickle checkpoint upload",
            422,
            "post",
            "/admin/models",
            who="admin",
            kw={"files": {"file": ("model.pth", torch_pickle_exploit())}, "data": {"name": "evil"}},
        ),
        Case(
            "raw pickle upload",
            422,
            "post",
            "/admin/models",
            who="admin",
            kw={"files": {"file": ("m.pkl", pickle.dumps(Exploit()))}, "data": {"name": "evil2"}},
        ),
        Case(
            "empty checkpoint upload",
            422,
            "post",
            "/admin/models",
            who="admin",
            kw={"files": {"file": ("m.pth", b"")}, "data": {"name": "empty"}},
        ),
        Case(
            "model name with traversal",
            422,
            "post",
            "/admin/models",
            who="admin",
            kw={"data": {"path": "tiny.safetensors", "name": "../x"}},
        ),
        Case(
            "unicode model name",
            422,
            "post",
            "/admin/models",
            who="admin",
            kw={"data": {"path": "tiny.safetensors", "name": "\u6a21\u578b\u2603"}},
        ),
        *(
            Case(
                f"registration option {k}={v!r}",
                422,
                "post",
                "/admin/models",
                who="admin",
                kw={"data": {"path": "tiny.safetensors", "name": "opt", k: v}},
            )
            for k, v in [
                ("sigma", "inf"),
                ("sigma", "nan"),
                ("mean", "nan,0.5,0.5"),
                ("std", "0,0,0"),
                ("mean", "1,2"),
                ("input_size", "-8"),
                ("num_heads", "0"),
            ]
        ),
        *(
            Case(
                f"training {desc}",
                422,
                "post",
                "/admin/training",
                who="admin",
                kw={"content": body, "headers": {"Content-Type": "application/json"}},
            )
            for desc, body in [
                (
                    "dataset outside the folder",
                    json.dumps({"kind": "pretrain", "dataset": "../../etc", "name": "t1"}),
                ),
                (
                    "absolute dataset path",
                    json.dumps({"kind": "pretrain", "dataset": "/etc", "name": "t2"}),
                ),
                (
                    "unknown hyper-parameter",
                    json.dumps(
                        {
                            "kind": "pretrain",
                            "dataset": "digits:train",
                            "name": "t3",
                            "params": {"__class__": 1},
                        }
                    ),
                ),
                ("unknown kind", json.dumps({"kind": "rm -rf", "dataset": "x", "name": "t4"})),
                (
                    "NaN sigma",
                    '{"kind": "pretrain", "dataset": "digits:train", "name": "t5", "sigma": NaN}',
                ),
                (
                    "infinite epochs",
                    '{"kind": "pretrain", "dataset": "digits:train", "name": "t6", '
                    '"params": {"epochs": Infinity}}',
                ),
                (
                    "negative epochs",
                    '{"kind": "pretrain", "dataset": "digits:train", "name": "t7", '
                    '"params": {"epochs": -3}}',
                ),
                ("not JSON", "kind=pretrain"),
                ("a JSON array", "[1, 2, 3]"),
            ]
        ),
        Case("unknown training run", 404, "get", "/admin/training/not-a-run", who="admin"),
        Case("activate an unknown model", 404, "post", "/admin/models/nope/activate", who="admin"),
    ]
    return cases
