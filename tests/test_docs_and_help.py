"""What a new user reads first says the truth: every CLI option's help states its default,
the README says how to pick the port (and `make run` honours it), the quick-start outputs are
git-ignored, the serve address shown is one a client can use, and docs/API.md's defaults for
POST /certify are the schema's.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli import build_parser
from cli.service import base_url

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "dmae-certify")


def _parsers(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, Any]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from _parsers(child, f"{name} {sub}")


def test_every_option_help_states_its_default() -> None:
    checked = 0
    for name, parser in _parsers(build_parser(), "dmae-certify"):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0:
                continue  # positionals and flags
            if action.default in (None, "", argparse.SUPPRESS):
                continue
            checked += 1
            text = formatter._expand_help(action)
            assert "default" in text, f"{name} {action.option_strings[0]}: {text!r}"
    assert checked > 50


def test_certify_help_shows_alpha_and_batch_defaults() -> None:
    out = subprocess.run([CLI, "certify", "--help"], capture_output=True, text=True, check=True)
    text = " ".join(out.stdout.split())
    assert "--alpha ALPHA failure probability (default: 0.001)" in text
    assert "--batch BATCH noisy copies per forward pass (default: 1000)" in text


@pytest.mark.parametrize(
    ("host", "port", "url"),
    [
        ("127.0.0.1", 8000, "http://127.0.0.1:8000"),
        ("0.0.0.0", 8081, "http://127.0.0.1:8081"),
        ("::", 9000, "http://[::1]:9000"),
        ("::1", 9000, "http://[::1]:9000"),
        ("api.internal", 80, "http://api.internal:80"),
    ],
)
def test_serve_address_is_reachable(host: str, port: int, url: str) -> None:
    assert base_url(host, port) == url


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_readme_says_how_to_choose_the_port_and_make_honours_it() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make run PORT=" in readme
    out = subprocess.run(
        ["make", "-n", "run", "PORT=8123", "HOST=0.0.0.0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "serve --host 0.0.0.0 --port 8123" in out.stdout


def _written_by_readme() -> set[str]:
    """Files the commands of the README and docs/API.md write into the current folder
    (``--out``/``--plot``/``--json`` FILE, ``.save('FILE')``, ``> FILE``)."""
    text = (ROOT / "README.md").read_text() + (ROOT / "docs" / "API.md").read_text()
    found = set(re.findall(r"--(?:out|plot|json)\s+([\w.-]+\.\w+)\b", text))
    found |= set(re.findall(r"\.save\('([\w.-]+)'\)", text))
    found |= set(re.findall(r"\s>\s*([\w.-]+\.\w+)\b", text))
    return found


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_quick_start_outputs_are_git_ignored() -> None:
    outputs = _written_by_readme()
    assert {
        "digit.png",
        "digits.tsv",
        "digits.png",
        "bench.json",
        "job.json",
        "keys.json",
    } <= outputs
    for name in sorted(outputs):
        ignored = subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT)
        assert ignored.returncode == 0, f"{name} (written by a README command) is not ignored"
    # ... and only there: a file of the same name elsewhere is not hidden.
    assert subprocess.run(["git", "check-ignore", "-q", "bench/digits.png"], cwd=ROOT).returncode


def test_api_md_certify_defaults_are_the_schemas(tmp_path: Path) -> None:
    from cli.asgi import create_app
    from domain.config import Settings
    from domain.services.submissions import Params

    app = create_app(Settings(_env_file=None, data_dir=tmp_path))  # type: ignore[call-arg]
    body = app.openapi()["components"]["schemas"]["Body_certify"]
    text = (ROOT / "docs" / "API.md").read_text()
    section = text.split("### `POST /certify`", 1)[1].split("\n#", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", section, re.M))
    assert set(rows) == set(body["properties"])
    for name, field in body["properties"].items():
        said = rows[name].strip().strip("`")
        if name in body["required"]:
            assert said == "required", name
        elif field.get("default") is not None:
            assert said == f"{field['default']}", (name, said, field["default"])
        elif name == "n0":  # derived from the mode: the row, the schema and Params agree
            certify, decide = (Params(mode=m).selection_samples() for m in ("certify", "decide"))
            assert said == f"{certify}; `decide`: {decide}", said
            assert f"default {certify};" in field["description"], field["description"]
            assert f"decide: default {decide}" in field["description"], field["description"]
        else:  # no default: the server derives it, or another field stands in for it
            assert said in ("-", "derived") or said.startswith("required unless"), (name, said)


def test_api_md_mode_row_and_unknown_model_status_are_the_servers(tmp_path: Path) -> None:
    """Issue 32: API.md's ``mode`` row left out ``decide``, and it said an unknown model is 404
    where ``POST /certify`` answers 422. Every mode the schema accepts is in the row, and the
    status the docs give for an unknown ``model`` is the server's."""
    from fastapi.testclient import TestClient
    from service_support import digit_png

    from cli.asgi import create_app
    from domain.config import Settings
    from domain.keys import create_key

    settings = Settings(_env_file=None, data_dir=tmp_path, register_bundled=False)  # type: ignore[call-arg]
    app = create_app(settings)
    body = app.openapi()["components"]["schemas"]["Body_certify"]
    modes = body["properties"]["mode"].get("enum") or [
        v for branch in body["properties"]["mode"].get("anyOf", []) for v in branch.get("enum", [])
    ]
    assert "decide" in modes
    text = (ROOT / "docs" / "API.md").read_text()
    section = text.split("### `POST /certify`", 1)[1].split("\n#", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^\n]+) \|$", section, re.M))
    for mode in modes:
        assert f"`{mode}`" in rows["mode"], f"API.md's mode row does not list {mode}"
    with TestClient(app) as client:
        with app.state.db.session() as s:
            key = create_key(s, "docs")[1]
        r = client.post(
            "/certify",
            headers={"X-API-Key": key},
            files={"image": ("d.png", digit_png(0), "image/png")},
            data={"model": "no-such-model"},
        )
    assert r.status_code == 422 and "unknown model 'no-such-model'" in r.json()["detail"]
    assert "**422**" in rows["model"]
    assert "404 unknown job/model" not in text
    assert "a request's `model` field naming an unknown model is\n422" in text
