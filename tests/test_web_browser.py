"""The web page at / in a real browser: Debian's chromium driven by Playwright, against the
embedded service (a real uvicorn server on a free port, SQLite, the in-process runner and the
bundled digits models).

A person certifies a digit and reads the certificate (label and radius as the API has them,
the radius rounded down), watches a long job's progress and cancels it, gets the API's own
sentence for a bad file, browses their history, and an admin registers a model and trains one.
No test may leave an error in the browser console (apart from the HTTP error it provokes).

Set DMAE_SCREENSHOTS=1 to also write the screenshots shown in the README to docs/img/.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from playwright.sync_api import Browser, Locator, Page, ViewportSize, expect, sync_playwright
from service_support import digit_png, make_checkpoint, service_settings

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium; .ci/run "
    "installs it); Playwright's own browser download is not used",
)


ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "img"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
# How long anything may take: minutes, so that a shared, busy host (six busy processes on two
# cores) slows the tests down without failing them. Both Playwright's actions (the page's
# default timeout) and its expect() assertions (5 s unless set here) wait this long.
WAIT_MS = 300_000
WAIT_S = WAIT_MS / 1000
expect.set_options(timeout=WAIT_MS)


def round_down(value: float, digits: int) -> str:
    """The reference for what the page shows: the JSON number's decimal form, floored."""
    return str(Decimal(repr(value)).quantize(Decimal(10) ** -digits, rounding=ROUND_FLOOR))


def eventually(check: Callable[[], Any], timeout: float = WAIT_S, what: str = "") -> Any:
    """Poll ``check`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


@dataclass
class Web:
    """The running service, its keys, and a plain HTTP client to ask the API what it says."""

    url: str
    admin: str
    alice: str
    bob: str
    carol: str
    upload: Path
    app: Any
    http: httpx.Client = field(default_factory=httpx.Client)

    def get(self, path: str, key: str, **kw: Any) -> Any:
        r = self.http.get(self.url + path, headers={"X-API-Key": key}, **kw)
        assert r.status_code == 200, r.text
        return r.json()

    def submit(self, key: str, png: bytes, **form: str) -> dict[str, Any]:
        r = self.http.post(
            self.url + "/certify",
            headers={"X-API-Key": key},
            files={"image": ("d.png", png)},
            data=form,
        )
        assert r.status_code in (200, 202), r.text
        body: dict[str, Any] = r.json()
        return body

    def wait(self, key: str, job_id: str) -> dict[str, Any]:
        def done() -> Any:
            job = self.get(f"/jobs/{job_id}", key)
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        job: dict[str, Any] = eventually(done, what=f"job {job_id} finished")
        return job


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    import uvicorn

    from cli.asgi import create_app
    from domain.keys import create_key

    base = tmp_path_factory.mktemp("web")
    upload = make_checkpoint(base / "to-upload" / "tiny-web.safetensors", name="tiny-web")
    settings = service_settings(base / "data", register_bundled=True, runner_threads=2)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="web-test-server", daemon=True)
    thread.start()
    eventually(lambda: server.started, what="the server started")
    port = server.servers[0].sockets[0].getsockname()[1]
    with app.state.db.session() as s:
        admin, alice, bob, carol = (create_key(s, n, admin=n == "admin")[1] for n in
                                    ("admin", "alice", "bob", "carol"))  # fmt: skip
    try:
        yield Web(f"http://127.0.0.1:{port}", admin, alice, bob, carol, upload, app)
    finally:
        server.should_exit = True
        thread.join(WAIT_S)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@dataclass
class Tab:
    """One browser tab on the service; records console errors and uncaught exceptions."""

    page: Page
    web: Web
    problems: list[str]
    http_errors_expected: set[int] = field(default_factory=set)

    def open(self, view: str, key: str) -> Page:
        """Load the page, type the key and press Enter (keyboard only), show ``view``."""
        self.page.goto(f"{self.web.url}/#{view}")
        expect(self.page.get_by_role("button", name="Use key")).to_be_enabled()  # page ready
        control(self.page, "API key").fill(key)
        control(self.page, "API key").press("Enter")
        return self.page

    def models_loaded(self) -> None:
        """Wait until the model picker is filled (as a person would before pressing Certify)."""
        expect(control(self.page, "Model")).to_have_value(re.compile(r"\S"))

    def expect_http_error(self, status: int) -> None:
        """The test provokes this status: the browser's console line about it is expected."""
        self.http_errors_expected.add(status)

    def screenshot(self, name: str, full_page: bool = True) -> None:
        """docs/img/<name>.png (256 colours), only when DMAE_SCREENSHOTS=1."""
        if os.environ.get("DMAE_SCREENSHOTS") != "1":
            return
        self.page.evaluate("() => document.activeElement && document.activeElement.blur()")
        png = self.page.screenshot(full_page=full_page, animations="disabled")
        shot = Image.open(io.BytesIO(png))
        SHOTS.mkdir(parents=True, exist_ok=True)
        shot.convert("RGB").quantize(colors=256).save(SHOTS / f"{name}.png", optimize=True)

    def unexpected(self) -> list[str]:
        allowed = tuple(f"status of {s} " for s in self.http_errors_expected)
        return [p for p in self.problems if not any(a in p for a in allowed)]


@pytest.fixture
def tab(browser: Browser, web: Web) -> Iterator[Tab]:
    with open_tab(browser, web, viewport=DESKTOP) as t:
        yield t


@contextlib.contextmanager
def open_tab(browser: Browser, web: Web, **context_options: Any) -> Iterator[Tab]:
    """A tab in a fresh browser context (``context_options``: Playwright's ``new_context``);
    fails if the page logged an error the tab did not expect."""
    context = browser.new_context(**context_options)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(f"uncaught exception: {exc}"))
    t = Tab(page, web, problems)
    yield t
    context.close()
    assert not t.unexpected(), f"errors in the browser console: {t.unexpected()}"


def control(scope: Page | Locator, label: str) -> Locator:
    """The control labelled exactly ``label`` (labels are how a person finds a control)."""
    return scope.get_by_label(label, exact=True)


def natural_width(page: Page, name: str | re.Pattern[str]) -> int:
    img = page.get_by_role("img", name=name)
    expect(img).to_be_visible()
    loaded = eventually(lambda: img.evaluate("i => i.complete && i.naturalWidth"), what=str(name))
    return int(loaded)


def job_id_of(page: Page) -> str:
    page.wait_for_url(re.compile("#job/."))  # Playwright's wait: page.url alone is not polled
    return page.url.split("#job/", 1)[1]


# ---------------------------------------------------------------------------------- tests


def test_certify_a_digit_and_read_the_certificate(tab: Tab, web: Web, tmp_path: Path) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(digit_png(0))
    page = tab.open("certify", web.alice)
    control(page, "Model").select_option("digits-s0.25")
    expect(control(page, "sigma (noise level)")).to_have_value("0.25")
    expect(control(page, "n (estimation samples)")).to_have_value("10000")  # the API's
    control(page, "Image").set_input_files(image)
    expect(page.get_by_role("img", name="Preview of digit.png")).to_be_visible()
    page.get_by_role("button", name="Certify", exact=True).click()

    certificate = page.get_by_role("region", name="Certificate")
    expect(certificate).to_be_visible()
    job = web.get(f"/jobs/{job_id_of(page)}", web.alice)
    cert = job["certificate"]
    assert job["status"] == "succeeded" and not cert["abstained"] and cert["radius"] > 0
    expect(certificate.locator('[data-field="label"]')).to_have_text(cert["label"])
    expect(certificate.locator('[data-field="radius"]')).to_have_text(round_down(cert["radius"], 3))
    expect(certificate.locator('[data-field="pa_lower"]')).to_have_text(
        round_down(cert["pa_lower"], 4)
    )
    for fact in (str(cert["seed"]), cert["checkpoint_sha256"], "10,000", "0.001", "digits-s0.25"):
        expect(certificate).to_contain_text(fact)
    expect(certificate.get_by_role("link", name="Certificate JSON")).to_have_attribute(
        "download", f"job-{job['id']}.json"
    )
    expect(page.get_by_role("progressbar", name="Progress")).to_have_attribute("max", "10100")

    assert natural_width(page, re.compile("exactly as certified")) == 8
    assert natural_width(page, re.compile("noisy")) == 4 * 8 + 3
    tab.screenshot("certify")


def test_a_typed_key_is_used_without_pressing_use_key(tab: Tab, web: Web, tmp_path: Path) -> None:
    """A person pastes the key and goes on (no "Use key", no Enter): the models fill in while
    they pick an image, and Certify sends the key, even pressed at once. Before, the alert said
    "missing API key" and the model list stayed empty. "Forget" still clears it."""
    page = tab.page
    page.goto(f"{web.url}/#certify")
    expect(page.get_by_role("button", name="Use key")).to_be_enabled()  # page ready
    expect(page.locator("#no-key-hint")).to_be_visible()
    control(page, "API key").fill(web.alice)  # one input event, as a paste is
    control(page, "Image").set_input_files(_digit(tmp_path, 4))
    control(page, "n (estimation samples)").fill("200")
    page.get_by_role("button", name="Certify", exact=True).click()
    expect(page.get_by_role("region", name="Certificate")).to_be_visible()
    job = web.get(f"/jobs/{job_id_of(page)}", web.alice)
    assert job["status"] == "succeeded" and job["n"] == 200 and job["sigma"] == 0.25, job
    expect(page.locator("#certify-alert")).to_have_text("")
    expect(page.locator("#no-key-hint")).to_be_hidden()

    page.get_by_role("button", name="Forget").click()
    expect(control(page, "API key")).to_have_value("")
    expect(page.locator("#no-key-hint")).to_be_visible()
    assert page.evaluate("() => sessionStorage.length") == 0
    # nothing the forgotten key was shown stays: no model list, no sigma
    expect(control(page, "Model").locator("option")).to_have_count(0)
    expect(control(page, "sigma (noise level)")).to_have_value("")
    # Typed key by key, then left alone: the model list fills once typing pauses.
    page.goto(f"{web.url}/#certify")  # only the fragment changes: reload the page too
    page.reload()
    expect(page.get_by_role("button", name="Use key")).to_be_enabled()
    expect(control(page, "Model")).to_have_value("")
    control(page, "API key").press_sequentially(web.bob)
    tab.models_loaded()
    expect(control(page, "sigma (noise level)")).not_to_have_value("")
    tab.expect_http_error(401)  # the first keystrokes may be asked about while typing


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_certify_brings_the_job_into_view_and_focus(
    tab: Tab, web: Web, tmp_path: Path, viewport: ViewportSize
) -> None:
    """At 390 px the form is long and the job panel sits above it: after Certify, pressed at
    the form's bottom, the panel is scrolled into view, focus moves to its title, and a live
    region tells screen readers (before, the page stayed scrolled at the button)."""
    page = tab.page
    page.set_viewport_size(viewport)
    tab.open("certify", web.carol)
    tab.models_loaded()
    control(page, "Image").set_input_files(_digit(tmp_path, 6))
    control(page, "n (estimation samples)").fill("300")
    page.evaluate("""() => { window.said = []; new MutationObserver(() => {
        const t = document.querySelector('#announce[aria-live="polite"]')?.textContent;
        if (t && t !== window.said.at(-1)) window.said.push(t);
      }).observe(document.body, {childList: true, characterData: true, subtree: true}); }""")
    button = page.get_by_role("button", name="Certify", exact=True)
    button.scroll_into_view_if_needed()
    assert page.evaluate("() => window.scrollY") > 0 or viewport == DESKTOP
    button.click()
    job_id = job_id_of(page)
    title = page.get_by_role("heading", name=f"Job {job_id}")
    expect(title).to_be_in_viewport()
    expect(page.locator("#job-status")).to_be_in_viewport()
    expect(title).to_be_focused()
    expect(page.get_by_role("region", name="Certificate")).to_be_visible()
    said = eventually(lambda: page.evaluate("() => window.said.length >= 2 && window.said"),
                      what="the job announced")  # fmt: skip
    assert said[0].startswith(f"Job {job_id} submitted"), said
    assert re.match(rf"Job {job_id} done: (label \S+, certified radius|abstained)", said[-1]), said


def test_decide_a_digit_at_a_target_radius(tab: Tab, web: Web, tmp_path: Path) -> None:
    """The sequential mode from the page: the target field is enabled only for decide, and the
    certificate shows the decision and the samples used, as the API stored them."""
    image = tmp_path / "digit.png"
    image.write_bytes(digit_png(1))
    page = tab.open("certify", web.alice)
    control(page, "Model").select_option("digits-s0.25")
    expect(control(page, "Target radius (decide)")).to_be_disabled()
    control(page, "Mode").select_option("decide")
    expect(control(page, "Time budget, seconds (certify, optional)")).to_be_disabled()
    control(page, "Target radius (decide)").fill("0.25")
    control(page, "Image").set_input_files(image)
    page.get_by_role("button", name="Certify", exact=True).click()
    certificate = page.get_by_role("region", name="Certificate")
    expect(certificate).to_be_visible()
    cert = web.get(f"/jobs/{job_id_of(page)}", web.alice)["certificate"]
    assert cert["mode"] == "decide" and cert["target_radius"] == 0.25 and cert["n_used"] < 10_000
    expect(certificate.locator('[data-field="decision"]')).to_contain_text(cert["decision"])
    expect(certificate).to_contain_text(f"{cert['n_used']:,}")


def test_n0_follows_the_mode_and_keeps_what_was_typed(tab: Tab, web: Web) -> None:
    """n0's default switches with the mode (100 to select, 0 for decide's merged test); a mode
    without n0 (predict) greys it out with its value left as it was (the page showed 0 there
    after the mode registry came in), and a value typed by hand is never replaced."""
    page = tab.open("certify", web.alice)
    n0, mode = control(page, "n0 (selection samples)"), control(page, "Mode")
    expect(n0).to_have_value("100")
    mode.select_option("predict")
    expect(n0).to_be_disabled()
    expect(n0).to_have_value("100")
    mode.select_option("decide")
    expect(n0).to_have_value("0")
    mode.select_option("certify")
    expect(n0).to_have_value("100")
    n0.fill("250")
    for other in ("predict", "decide", "certify"):
        mode.select_option(other)
        expect(n0).to_have_value("250")


def test_watch_progress_then_cancel_a_long_job(tab: Tab, web: Web, tmp_path: Path) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(digit_png(1))
    page = tab.open("certify", web.alice)
    tab.models_loaded()
    control(page, "Image").set_input_files(image)
    control(page, "n (estimation samples)").fill("100000")
    page.get_by_role("button", name="Certify", exact=True).click()

    progress = page.get_by_role("progressbar", name="Progress")
    expect(progress).to_have_attribute("max", "100100")
    done = eventually(
        lambda: progress.evaluate("p => p.value > 0 && p.value < p.max && p.value"),
        what="the progress bar moved",
    )
    expect(page.get_by_text(re.compile(r"of 100,100 noisy samples evaluated"))).to_be_visible()
    expect(page.locator("#job-status")).to_have_text(re.compile("^Running"))
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#job-status")).to_have_text(re.compile("^Cancelled"))
    expect(page.get_by_role("button", name="Cancel")).to_be_hidden()
    expect(page.get_by_role("region", name="Certificate")).to_be_hidden()
    job = web.get(f"/jobs/{job_id_of(page)}", web.alice)
    assert job["status"] == "cancelled" and 0 < done <= job["progress"]["done"] < 100_100


def test_a_bad_file_gets_the_apis_own_words(tab: Tab, web: Web, tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("shopping list: milk, eggs")
    said = web.http.post(
        web.url + "/certify",
        headers={"X-API-Key": web.alice},
        files={"image": ("notes.png", bad.read_bytes())},
        data={"sigma": "0.25"},
    )
    assert said.status_code == 415
    page = tab.open("certify", web.alice)
    tab.models_loaded()
    tab.expect_http_error(415)
    control(page, "Image").set_input_files(bad)
    page.get_by_role("button", name="Certify", exact=True).click()
    expect(page.get_by_role("alert")).to_have_text(said.json()["detail"])
    assert "not a supported image" in said.json()["detail"]
    # A wrong parameter: the API's sentence again.
    tab.expect_http_error(422)
    control(page, "Image").set_input_files(_digit(tmp_path))
    control(page, "alpha (failure probability)").fill("0.7")
    page.get_by_role("button", name="Certify", exact=True).click()
    expect(page.get_by_role("alert")).to_have_text("alpha must lie in [1e-100, 0.5), got 0.7")


def _digit(folder: Path, index: int = 3) -> Path:
    path = folder / f"digit{index}.png"
    path.write_bytes(digit_png(index))
    return path


def test_history_pages_and_opens_a_certificate(tab: Tab, web: Web) -> None:
    jobs = [web.submit(web.bob, digit_png(i), sigma="0.25", n0="20", n="200") for i in range(21)]
    for job in jobs:
        web.wait(web.bob, job["id"])
    page = tab.open("history", web.bob)
    expect(page.get_by_text("Jobs 1 to 20 of 21")).to_be_visible()
    rows = page.locator("#history-table tbody tr")
    expect(rows).to_have_count(20)
    listed = web.get("/jobs", web.bob, params={"limit": 20})["items"]
    for i, job in enumerate(listed):  # label and radius (rounded down) as the API has them
        c = job["certificate"]
        label, radius = ("abstained", "-") if c["abstained"] else (c["label"], round_down(
            c["radius"], 3))  # fmt: skip
        expect(rows.nth(i).locator("td").nth(3)).to_have_text(label)
        expect(rows.nth(i).locator("td").nth(4)).to_have_text(radius)
    assert any(j["certificate"]["abstained"] for j in listed)  # both kinds of row are shown
    newest = listed[0]
    assert newest["id"] == jobs[-1]["id"] and not newest["certificate"]["abstained"]
    expect(page.get_by_role("region", name="Evaluations")).to_contain_text("No evaluations yet.")
    tab.screenshot("history")
    page.get_by_role("button", name="Next").click()
    expect(page.get_by_text("Jobs 21 to 21 of 21")).to_be_visible()
    page.get_by_role("button", name="Previous").click()
    page.get_by_role("link", name=f"Open job {newest['id']}").click()
    certificate = page.get_by_role("region", name="Certificate")
    expect(certificate.locator('[data-field="radius"]')).to_have_text(
        round_down(newest["certificate"]["radius"], 3)
    )


def test_history_lists_evaluations_with_their_curve_and_tsv(tab: Tab, web: Web) -> None:
    r = web.http.post(
        web.url + "/evaluations",
        headers={"X-API-Key": web.alice},
        data={"dataset": "digits:test", "model": "digits-s0.25", "n0": "20", "n": "200",
              "max": "6"},
    )  # fmt: skip
    assert r.status_code == 202, r.text

    def done() -> Any:
        ev = web.get(r.json()["url"], web.alice)
        return ev if ev["status"] not in ("queued", "running") else None

    ev = eventually(done, what="the evaluation finished")
    assert ev["status"] == "succeeded", ev
    web.wait(web.alice, web.submit(web.alice, digit_png(31), sigma="0.25", n="200")["id"])
    page = tab.open("history", web.alice)
    # The 6 per-image jobs are summed up under Evaluations, not listed among the jobs...
    own = web.get("/jobs", web.alice, params={"evaluations": "exclude"})["total"]
    expect(page.locator("#history-page")).to_have_text(re.compile(rf"of {own}$"))
    expect(page.locator("#history-table")).not_to_contain_text("image of evaluation")
    # ...unless asked for.
    control(page, "Jobs of evaluations").select_option("only these")
    expect(page.locator("#history-page")).to_have_text("Jobs 1 to 6 of 6")
    kinds = page.locator("#history-table tbody tr td:nth-child(7)")
    expect(kinds).to_have_text([f"image of evaluation {ev['id'][:8]}"] * 6)
    control(page, "Jobs of evaluations").select_option("shown")
    expect(page.locator("#history-page")).to_have_text(re.compile(rf"of {own + 6}$"))
    row = page.get_by_role("region", name="Evaluations").locator(
        f'tr[data-evaluation="{ev["id"]}"]'
    )
    cells = row.locator("td")
    expect(cells.nth(1)).to_have_text("succeeded")
    expect(cells.nth(4)).to_have_text("6 of 6")
    expect(cells.nth(5)).to_have_text(round_down(ev["certified_accuracy"][0]["accuracy"], 3))
    assert natural_width(page, f"Certified accuracy against radius, evaluation {ev['id']}") > 100
    page.get_by_role("region", name="Evaluations").scroll_into_view_if_needed()
    tab.screenshot("evaluations", full_page=False)
    with page.expect_download() as download:
        row.get_by_role("button", name=f"Download the TSV of evaluation {ev['id']}").click()
    assert download.value.suggested_filename == f"evaluation-{ev['id']}.tsv"
    tsv = web.http.get(web.url + ev["results_url"], headers={"X-API-Key": web.alice}).text
    assert Path(download.value.path()).read_text() == tsv and len(tsv.splitlines()) == 7


def test_history_labels_a_replay_as_a_replay(tab: Tab, web: Web) -> None:
    job = web.submit(web.admin, digit_png(30), sigma="0.25", n0="20", n="200")
    web.wait(web.admin, job["id"])
    r = web.http.post(f"{web.url}/jobs/{job['id']}/replay", headers={"X-API-Key": web.admin})
    assert r.status_code == 202, r.text
    replay = web.wait(web.admin, r.json()["id"])
    page = tab.open("history", web.admin)
    row = page.get_by_role("row").filter(
        has=page.get_by_role("link", name=f"Open job {replay['id']}")
    )
    expect(row.locator("td").nth(6)).to_have_text(f"replay of {job['id'][:8]}")
    expect(page.get_by_role("row").filter(
        has=page.get_by_role("link", name=f"Open job {job['id']}")).locator("td").nth(6)
    ).to_have_text("request")  # fmt: skip
    row.get_by_role("link", name=job["id"][:8]).click()
    expect(page.get_by_role("heading", name=f"Job {job['id']}")).to_be_focused()
    page.goto(f"{web.url}/#job/{replay['id']}")
    expect(page.get_by_role("heading", name=f"Job {replay['id']}: replay of job {job['id']}")
           ).to_be_visible()  # fmt: skip


def test_an_admin_registers_a_model(tab: Tab, web: Web) -> None:
    page = tab.open("admin/models", web.carol)  # a client key: the API's refusal is shown
    tab.expect_http_error(403)
    expect(page.get_by_role("alert")).to_have_text("this route needs an admin key")
    control(page, "API key").fill(web.admin)
    page.get_by_role("button", name="Use key").click()
    expect(page.get_by_role("row", name=re.compile("digits-s0.25"))).to_be_visible()

    control(page, "Checkpoint file").set_input_files(web.upload)
    control(page, "Licence note").fill("CC BY-NC 4.0 (test weights)")
    page.get_by_role("button", name="Register").click()
    expect(page.get_by_role("status").filter(has_text="Registered")).to_have_text(
        re.compile("^Registered tiny-web: classifier, sigma 0.25, 10 classes, active")
    )
    row = page.get_by_role("row", name=re.compile("tiny-web"))
    expect(row.locator(".licence-nc")).to_have_text("CC BY-NC 4.0 (test weights)")
    assert any(m["name"] == "tiny-web" for m in web.get("/models", web.alice))
    tab.screenshot("admin-models")

    row.get_by_role("button", name="Deactivate tiny-web", exact=True).click()
    expect(row.get_by_role("button", name="Activate tiny-web", exact=True)).to_be_visible()
    assert all(m["name"] != "tiny-web" for m in web.get("/models", web.alice))

    tab.expect_http_error(422)  # a path outside the server's checkpoint folder
    control(page, "A file in the server's checkpoint folder").check()
    control(page, "Path (relative to the checkpoint folder)").fill("../../etc/passwd")
    page.get_by_role("button", name="Register").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("outside the server's")


def test_an_admin_trains_and_watches_the_runs(tab: Tab, web: Web) -> None:
    page = tab.open("admin/training", web.admin)
    form = page.get_by_role("form", name="Launch a training run")
    expect(page.get_by_text("No training runs yet.")).to_be_visible()
    fast = {"epochs": 1, "batch_size": 512, "warmup_epochs": 0}
    control(form, "Kind").select_option("pretrain")
    control(form, "Start from (pre-trained model)").select_option("")
    control(form, "Name of the result").fill("web-pre")
    control(form, "Hyper-parameters (JSON)").fill(json.dumps({"arch": "tiny", **fast}))
    form.get_by_role("button", name="Launch").click()
    pre = page.get_by_role("article", name="Training run web-pre")
    expect(pre.get_by_role("heading")).to_have_text("web-pre (succeeded)", timeout=2 * WAIT_MS)
    expect(control(pre, "Log of web-pre")).to_contain_text("wrote")

    # Fine-tune a classifier from it: the page now offers it as the starting point.
    page.reload()
    expect(form.get_by_role("button", name="Launch")).to_be_enabled()
    control(form, "Kind").select_option("finetune")
    control(form, "Start from (pre-trained model)").select_option("web-pre")
    control(form, "Name of the result").fill("web-ft-s0.50")
    control(form, "Training sigma").fill("0.5")
    control(form, "Hyper-parameters (JSON)").fill(
        json.dumps({**fast, "eval_images": 5, "eval_n": 11})
    )
    form.get_by_role("button", name="Launch").click()
    ft = page.get_by_role("article", name="Training run web-ft-s0.50")
    expect(ft).to_be_visible()
    expect(ft.get_by_role("heading")).to_have_text("web-ft-s0.50 (succeeded)", timeout=2 * WAIT_MS)
    expect(ft).to_contain_text("registered as web-ft-s0.50")
    tab.screenshot("admin-training")

    tab.expect_http_error(422)
    control(form, "Name of the result").fill("bad/name")
    form.get_by_role("button", name="Launch").click()
    expect(page.get_by_role("alert")).to_contain_text("invalid model name")


def test_phone_width_and_labelled_controls(tab: Tab, web: Web) -> None:
    job = web.submit(web.carol, digit_png(5), sigma="0.25")
    web.wait(web.carol, job["id"])
    page = tab.page
    page.set_viewport_size(PHONE)
    page.goto(web.url + "/")
    unlabelled = """() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(e => e.offsetParent !== null)
        .filter(e => !((e.labels && e.labels.length) || e.getAttribute('aria-label')
                       || (e.tagName === 'BUTTON' && e.textContent.trim())))
        .map(e => e.outerHTML)"""
    for view, key in (
        (f"job/{job['id']}", web.carol),
        ("history", web.carol),
        ("admin/models", web.admin),
        ("admin/training", web.admin),
    ):
        page.get_by_role("button", name="Forget").click()  # the next view asks nothing yet
        tab.open(view, key)
        if view.startswith("job/"):
            expect(page.get_by_role("region", name="Certificate")).to_be_visible()
            natural_width(page, re.compile("noisy"))
            tab.screenshot("phone", full_page=False)
        else:
            expect(page.locator(f'[data-view="{view}"] .panel').first).to_be_visible()
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"{view}: the page is {width} px wide on a phone"
        assert page.evaluate(unlabelled) == [], view


def test_radius_is_rounded_down_never_to_nearest(tab: Tab, web: Web) -> None:
    """The page's roundDown against Decimal flooring, on edge cases and 400 random doubles."""
    tab.page.goto(web.url + "/")
    rng = random.Random(0)
    values = [0.49996, 0.499, 0.5, 0.9999999, 1e-7, 2.5e-5, 0.1 + 0.2, 1 / 3, 0.0, 3.0, 1e21]
    values += [rng.uniform(0, 4) for _ in range(200)] + [rng.random() ** 8 for _ in range(200)]
    shown = tab.page.evaluate(
        """async (xs) => { const f = await import('/static/js/format.js');
           return xs.map(x => [f.roundDown(x, 3), f.roundDown(x, 4)]); }""",
        values,
    )
    for value, (three, four) in zip(values, shown, strict=True):
        assert (three, four) == (round_down(value, 3), round_down(value, 4)), value
    assert shown[0] == ["0.499", "0.4999"]  # not 0.500 / 0.5000


def test_sequential_and_input_fields_are_shown_when_a_certificate_has_them(
    tab: Tab, web: Web
) -> None:
    """Fields other services add to a certificate (the sequential mode's decision and samples
    used) and the input's preprocessing steps and warnings are read out when present. The page
    shows the upload's own record (the job's, or ``?upload=``'s), not the certificate's copy."""
    from sqlalchemy import select, update

    from domain.store.tables import Certificate, Job

    job = web.submit(web.carol, digit_png(8), sigma="0.25", n0="20", n="500")
    stored = web.wait(web.carol, job["id"])["certificate"]
    extra = {
        "decision": "certified",
        "target_radius": 0.25,
        "n_used": 384,
        "bound": "beta-binomial-mixture-cs",
        "preprocessing": ["decoded PNG 8x8", "converted to RGB", "scaled to [0,1]"],
        "warnings": ["a test warning: far from the model's domain"],
    }
    record = {k: extra.pop(k) for k in ("preprocessing", "warnings")}
    with web.app.state.db.session() as s:
        s.execute(
            update(Certificate)
            .where(Certificate.job_id == job["id"])
            .values(body={**stored, **extra})
        )
        row = s.scalar(select(Job.input_record).where(Job.id == job["id"]))
        s.execute(
            update(Job).where(Job.id == job["id"]).values(input_record={**(row or {}), **record})
        )
        s.commit()
    page = tab.open(f"job/{job['id']}", web.carol)
    certificate = page.get_by_role("region", name="Certificate")
    expect(certificate.locator('[data-field="decision"]')).to_have_text("certified at radius 0.25")
    expect(certificate.locator('[data-field="n_used"]')).to_have_text("384")
    expect(certificate).to_contain_text("384 of at most 500")
    expect(certificate).to_contain_text("(beta-binomial-mixture-cs)")
    expect(certificate.get_by_role("listitem")).to_have_text(
        [*record["preprocessing"], *record["warnings"]]
    )
