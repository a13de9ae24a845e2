"""Large uploads are decoded a few at a time: each process converts at most twice the largest
accepted image's pixels at once (``domain.intake.images.PixelBudget``), since a 170 KB PNG of 6,300
x
6,300 RGBA pixels took about 800 MB while it was converted; small images never wait."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from PIL import Image

from domain.intake import images


def png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (side, side), (40, 80, 120, 200)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def concurrency(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The most conversions seen running at once (each made to last 0.2 s)."""
    most, now, lock = [0], [0], threading.Lock()
    convert = images.preprocess_image

    def slow(img: Any, size: int) -> Any:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.2)
        try:
            return convert(img, size)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(images, "preprocess_image", slow)
    yield most


def decode_together(data: bytes, threads: int, max_pixels: int) -> None:
    start = threading.Barrier(threads)

    def one() -> None:
        start.wait()
        images.decode_image(data, 8, max_pixels)

    runs = [threading.Thread(target=one) for _ in range(threads)]
    for t in runs:
        t.start()
    for t in runs:
        t.join(60)


def test_large_images_are_converted_at_most_two_at_once(concurrency: list[int]) -> None:
    """Six uploads of 1,200 x 1,200 (1.44 MP) under a limit of 1.5 MP: a budget of 3 MP lets
    two run together, never three (without the budget all six ran at once)."""
    decode_together(png(1200), 6, max_pixels=1_500_000)
    assert concurrency[0] == 2
    assert images.pixel_budget.in_use == 0  # all given back


def test_small_images_never_wait(concurrency: list[int]) -> None:
    decode_together(png(64), 6, max_pixels=1_500_000)
    assert concurrency[0] == 6
