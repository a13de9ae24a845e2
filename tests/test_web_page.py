"""The web page's files and routes, without a browser: everything it loads is served by the
service itself (no CDN), its defaults and limits are the API's, and an installed package (not
only a checkout) carries its files. The page in a real browser: tests/test_web_browser.py."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_support import service_settings

from app.routes.web import STATIC
from cli.asgi import create_app

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(service_settings(tmp_path / "data", n_max=5000, n0_max=300))
    with TestClient(app) as c:
        yield c


def test_the_page_and_every_file_it_loads_come_from_the_service(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert client.head("/").status_code == 200
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "form-action 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    local = re.findall(r'(?:src|href)="(/[^"]*)"', html)
    assert {"/static/app.css", "/static/js/main.js"} <= set(local)
    for path in local:
        assert client.get(path).status_code == 200, path
    # Every module the scripts import is there, and served as JavaScript.
    scripts = sorted((STATIC / "js").glob("*.js"))
    for script in scripts:
        for name in re.findall(r'from "\./([\w.-]+\.js)"', script.read_text()):
            r = client.get(f"/static/js/{name}")
            assert r.status_code == 200, (script.name, name)
            assert "javascript" in r.headers["content-type"], name
    # Nothing names another host: the service runs air-gapped.
    for file in STATIC.rglob("*"):
        if file.is_file():
            text = re.sub(r'xmlns="[^"]*"', "", file.read_text())  # a namespace, not a fetch
            assert not re.search(r"https?://|//[a-z0-9-]+\.[a-z]", text), file


def test_config_has_the_apis_defaults_and_the_settings_limits(client: TestClient) -> None:
    config: dict[str, Any] = client.get("/web/config.json").json()
    schema = client.get("/openapi.json").json()
    body = schema["components"]["schemas"]["Body_certify"]["properties"]
    for name in ("alpha", "n", "mode"):
        assert config["defaults"][name] == body[name]["default"], name
    # n0 has no schema default: the server derives it from the mode, as its description says.
    assert "default" not in body["n0"]
    assert (config["defaults"]["n0"], config["defaults"]["decide_n0"]) == (100, 0)
    assert "certify modes: default 100; decide: default 0" in body["n0"]["description"]
    assert config["modes"] == ["certify", "predict", "certify_top2", "decide"]
    limits = config["limits"]
    assert (limits["n_max"], limits["n0_max"]) == (5000, 300)  # the settings, not the defaults
    assert (limits["alpha_above"], limits["alpha_below"]) == (0.0, 0.5)
    assert limits["noisy_copies_max"] == 16
    assert config["image_types"] == ["image/png", "image/jpeg", "image/webp"]
    # The page's own routes are not part of the API's schema.
    assert "/" not in schema["paths"] and "/web/config.json" not in schema["paths"]


def test_an_installed_package_carries_the_page() -> None:
    """pyproject's package data lists every file of app/web/static (Docker installs with
    ``pip install .``, which copies only what is listed)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["app"]
    files = [p.relative_to(ROOT / "app").as_posix() for p in STATIC.rglob("*") if p.is_file()]
    assert files
    for name in files:
        path = PurePosixPath(name)  # a setuptools glob: "*" stays within one folder
        assert any(
            len(path.parts) == len(PurePosixPath(p).parts) and path.match(p) for p in patterns
        ), name
