"""Drawing a digit on the page (app/web/static/js/draw.js), in Chromium: strokes drawn with
Playwright's mouse (and a finger, by touch events), Certify sends the canvas as a PNG exactly
like an upload, the service resizes it to the model's input and certifies it with the chosen
model. The service, browser and tab are tests/test_web_browser.py's fixtures."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, expect
from service_support import digit_png
from test_web_browser import (  # noqa: F401 - browser, tab and web are fixtures
    CHROMIUM,
    PHONE,
    WAIT_MS,
    Tab,
    Web,
    browser,
    control,
    job_id_of,
    open_tab,
    tab,
    web,
)

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"
)

MODEL = "mnist-s0.50"  # bundled, 28x28 inputs


def canvas_box(page: Page) -> tuple[float, float, float]:
    """The drawing area's left, top and side on the page, in CSS pixels."""
    canvas = page.get_by_role("img", name="Drawing area for a digit")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    assert box is not None and abs(box["width"] - box["height"]) < 1, box
    return box["x"], box["y"], box["width"]


def draw_one(page: Page) -> None:
    """A "1": one vertical stroke down the middle, drawn with the mouse in small steps."""
    x, y, side = canvas_box(page)
    page.mouse.move(x + side * 0.5, y + side * 0.2)
    page.mouse.down()
    page.mouse.move(x + side * 0.5, y + side * 0.8, steps=12)
    page.mouse.up()


def canvas_pixels(page: Page) -> np.ndarray:
    """The canvas's pixels (grey, 0..255), read back as the PNG the page would send."""
    url = page.evaluate("() => document.getElementById('draw-canvas').toDataURL('image/png')")
    png = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)


def input_png(web: Web, key: str, job_id: str) -> np.ndarray:
    """The job's input exactly as certified ((S, S) grey, 0..1)."""
    r = web.http.get(f"{web.url}/jobs/{job_id}/input.png", headers={"X-API-Key": key})
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("L"), dtype=np.float64) / 255


def certify_drawing(page: Page, web: Web, key: str) -> dict[str, Any]:
    """Press Certify, wait for the certificate, check what the page and the API say."""
    expect(page.locator("#image-source")).to_have_text("Certify sends the drawing (a 280x280 PNG).")
    page.get_by_role("button", name="Certify", exact=True).click()
    certificate = page.get_by_role("region", name="Certificate")
    expect(certificate).to_be_visible()
    job: dict[str, Any] = web.get(f"/jobs/{job_id_of(page)}", key)
    cert = job["certificate"]
    assert job["status"] == "succeeded" and cert["model"] == MODEL, job
    assert job["input_shape"] == [3, 28, 28] == cert["input_shape"], job
    assert job["preprocessing"][0] == "decode PNG RGBA 280x280", job["preprocessing"]
    if cert["abstained"]:
        expect(certificate).to_contain_text("Abstained")
    else:
        expect(certificate.locator('[data-field="label"]')).to_have_text(cert["label"])
        expect(certificate.locator('[data-field="radius"]')).to_have_text(re.compile(r"^\d"))
    # What was certified is the stroke: light on dark, as the MNIST models were trained.
    pixels = input_png(web, key, job["id"])
    assert pixels.shape == (28, 28)
    assert pixels[6:22, 13:15].mean() > 0.7, pixels.round(1)
    assert pixels[:, :6].max() < 0.05 and pixels[:, 22:].max() < 0.05, pixels.round(1)
    return job


def test_draw_a_one_with_the_mouse_and_certify_it(tab: Tab, web: Web, tmp_path: Path) -> None:
    page = tab.open("certify", web.alice)
    control(page, "Model").select_option(MODEL)
    expect(control(page, "sigma (noise level)")).to_have_value("0.5")
    control(page, "n (estimation samples)").fill("500")
    expect(page.locator("#image-source")).to_have_text("Choose a file or draw a digit.")
    assert canvas_pixels(page).max() == 0  # black paper, opaque

    # A file chosen first, then a stroke: the drawing replaces the file.
    image = tmp_path / "digit.png"
    image.write_bytes(digit_png(3))
    control(page, "Image").set_input_files(image)
    expect(page.locator("#image-source")).to_have_text("Certify sends the file digit.png.")
    draw_one(page)
    expect(page.get_by_role("img", name="Preview of digit.png")).to_be_hidden()
    assert page.evaluate("() => document.getElementById('image').files.length") == 0
    drawn = canvas_pixels(page)
    assert drawn[60:220, 135:145].min() == 255 and drawn[:, :80].max() == 0

    certify_drawing(page, web, web.alice)

    # Clear wipes it; choosing a file after drawing clears the drawing.
    page.get_by_role("button", name="Clear drawing").click()
    expect(page.locator("#image-source")).to_have_text("Choose a file or draw a digit.")
    assert canvas_pixels(page).max() == 0
    draw_one(page)
    control(page, "Image").set_input_files(image)
    expect(page.locator("#image-source")).to_have_text("Certify sends the file digit.png.")
    assert canvas_pixels(page).max() == 0


@pytest.fixture
def finger_tab(browser: Browser, web: Web) -> Iterator[Tab]:
    """A phone-sized tab with a touch screen."""
    with open_tab(browser, web, viewport=PHONE, has_touch=True, is_mobile=True) as t:
        yield t


def test_draw_with_a_finger_on_a_phone(finger_tab: Tab, web: Web) -> None:
    """Touch events (a finger dragged down the canvas) draw rather than scroll the page, and
    the page stays 390 px wide."""
    page = finger_tab.open("certify", web.bob)
    finger_tab.models_loaded()
    control(page, "Model").select_option(MODEL)
    control(page, "n (estimation samples)").fill("500")
    x, y, side = canvas_box(page)
    scrolled = page.evaluate("() => window.scrollY")
    cdp = page.context.new_cdp_session(page)
    steps = [(x + side * 0.5, y + side * (0.2 + 0.6 * i / 12)) for i in range(13)]
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart",
             "touchPoints": [{"x": steps[0][0], "y": steps[0][1]}]})  # fmt: skip
    for px, py in steps[1:]:
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove",
                 "touchPoints": [{"x": px, "y": py}]})  # fmt: skip
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    assert page.evaluate("() => window.scrollY") == scrolled  # the finger drew, not scrolled
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page is {width} px wide on a phone"
    certify_drawing(page, web, web.bob)
