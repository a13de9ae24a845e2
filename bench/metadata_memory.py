"""Peak memory of decoding PNGs that carry large compressed text (issue 26, item 3).

The input: a 64x64 digit PNG with 60 compressed text chunks (30 zTXt, 30 iTXt) of 1 MB each
once inflated (about 66 KB on disk). Each measurement runs in a fresh process (peak RSS is a
high-water mark), first one ``domain.intake.images.decode_image`` of it, then 40 threads decoding it
at once (as 40 concurrent uploads do in one API process), against the plain PNG as baseline.

    PYTHONPATH=. .venv/bin/python -m bench.metadata_memory             # this checkout
    PYTHONPATH=/other/checkout .venv/bin/python -m bench.metadata_memory  # e.g. before

Prints peak RSS in MB for each case.
"""

from __future__ import annotations

import io
import resource
import struct
import subprocess
import sys
import threading
import zlib

THREADS = 40


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def pngs() -> tuple[bytes, bytes]:
    """(the plain 64x64 digit PNG, the same with 60 x 1 MB compressed text chunks)."""
    from PIL import Image

    from models.data import load_digits_split

    x, _, _ = load_digits_split("test")
    arr = (x[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).resize((64, 64)).save(buf, "PNG")
    plain = buf.getvalue()
    text = zlib.compress(b"a" * 1_000_000, 9)  # 1 MB inflated, about 1 KB in the file
    extra = b""
    for i in range(30):
        extra += _chunk(b"zTXt", f"z{i}".encode() + b"\0\0" + text)
        extra += _chunk(b"iTXt", f"i{i}".encode() + b"\0\1\0\0\0" + text)
    end = 8 + 12 + struct.unpack(">I", plain[8:12])[0]  # after IHDR
    return plain, plain[:end] + extra + plain[end:]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(which: str, threads: int) -> None:
    """In this process: decode ``which`` ('plain' or 'text') in ``threads`` threads at once."""
    from domain.errors import ServiceError
    from domain.intake.images import decode_image

    plain, text = pngs()
    decode_image(plain, 64, 10_000_000)  # warm: imports, allocator
    data = plain if which == "plain" else text
    start = threading.Barrier(threads)
    outcome: list[str] = []

    def one() -> None:
        start.wait()
        try:
            decode_image(data, 64, 10_000_000)
            outcome.append("ok")
        except ServiceError as exc:
            outcome.append(f"{exc.status_code}")

    workers = [threading.Thread(target=one) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(f"{_peak_mb():.0f} {sorted(set(outcome))}")


def main() -> None:
    if len(sys.argv) == 3:
        measure(sys.argv[1], int(sys.argv[2]))
        return
    plain, text = pngs()
    print(f"PNG with text: {len(text) / 1000:.0f} KB on disk (plain: {len(plain) / 1000:.1f} KB)")
    for threads in (1, THREADS):
        row = []
        for which in ("plain", "text"):
            run = subprocess.run(
                [sys.executable, __file__, which, str(threads)], capture_output=True, text=True
            )
            row.append(run.stdout.strip() or run.stderr.strip().splitlines()[-1])
        print(f"{threads:>2} at once: peak RSS MB [outcome] plain {row[0]}; text {row[1]}")


if __name__ == "__main__":
    main()
