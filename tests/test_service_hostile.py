"""Hostile requests (tests/hostile_corpus.py): every one answered with the expected 4xx and a
readable ``detail``, none with a 5xx, no pickled code run, and nothing stored: no job, input,
certificate, model, training run or idempotency key row, and no file left in the upload
folders."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hostile_corpus import VALID_FORM, corpus, torch_pickle_exploit
from service_support import (  # noqa: F401 - tiny_checkpoint is a fixture
    digit_png,
    make_checkpoint,
    service_settings,
    tiny_checkpoint,
)
from sqlalchemy import func, select
from test_service_embedded import Recorder, Service

from cli.asgi import create_app
from domain.store.tables import (
    ApiKey,
    Certificate,
    Checkpoint,
    IdempotencyKey,
    Job,
    JobInput,
    TrainingRun,
)

TABLES = (ApiKey, Certificate, Checkpoint, IdempotencyKey, Job, JobInput, TrainingRun)


def _rows(app: Any) -> dict[str, int]:
    with app.state.db.session() as s:
        return {
            t.__tablename__: int(s.scalar(select(func.count()).select_from(t)) or 0) for t in TABLES
        }


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def service(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Service]:  # noqa: F811
    settings = service_settings(
        tmp_path / "data", rate_limit_requests=0, max_image_pixels=40_000_000
    )
    app = create_app(settings, dispatcher=Recorder())  # nothing runs: only storage is checked
    with TestClient(app, raise_server_exceptions=False) as client:  # a 5xx is counted
        svc = Service(client, app, tiny_checkpoint)
        assert svc.register().status_code == 201
        # Files an attacker may point registration at, inside and outside the folder.
        outside = make_checkpoint(tmp_path / "outside.safetensors", name="outside")
        (tiny_checkpoint.parent / "link.safetensors").symlink_to(outside)
        (tiny_checkpoint.parent / "evil.pth").write_bytes(torch_pickle_exploit())
        yield svc


def test_hostile_corpus_gets_4xx_and_stores_nothing(
    service: Service, capfd: pytest.CaptureFixture[str]
) -> None:
    other = service.submit(service.bob, digit_png(0)).json()
    cases = corpus(digit_png(1), other["url"])
    assert len(cases) >= 40
    before_rows = _rows(service.app)
    data_dir = service.app.state.settings.data_dir
    before_files = _files(data_dir)
    keys = {"alice": service.alice, "bob": service.bob, "admin": service.admin, "none": ""}

    statuses: Counter[int] = Counter()
    wrong = []
    for case in cases:
        token = keys.get(case.who, case.who)
        kw = dict(case.kw)
        headers = dict(kw.pop("headers", {}))
        if token:
            headers["X-API-Key"] = token
        r = getattr(service.client, case.method)(case.path, headers=headers, **kw)
        statuses[r.status_code] += 1
        detail = (
            r.json().get("detail") if r.headers.get("content-type") == "application/json" else None
        )
        if r.status_code != case.expect or not isinstance(detail, str) or not detail:
            wrong.append((case.name, case.expect, r.status_code, r.text[:300]))
        assert "Traceback" not in r.text
    assert not [s for s in statuses if s >= 500], wrong
    assert wrong == [], "\n".join(map(str, wrong))
    assert _rows(service.app) == before_rows  # no job, input, model, run or key was stored
    assert _files(data_dir) == before_files  # no upload or partial file left behind
    assert "PWNED-BY-PICKLE" not in capfd.readouterr().out  # no pickled code ran
    with capfd.disabled():
        print(f"\nhostile corpus: {len(cases)} requests, statuses {dict(sorted(statuses.items()))}")
    assert not any(
        name.startswith(".upload-") for name in os.listdir(service.app.state.settings.uploads)
    )


PATH_LIKE = (
    "../", "..", ".", "./", "/", "//", "../../etc", "/etc", "/etc/passwd", "..\\..\\windows",
    "C:\\Windows", "~", "~root/.ssh", "%2e%2e/", "a/../../b", "nul\x00byte", "no-such-folder",
    "escape", "notes.txt", "empty", "../datasets/../checkpoints", "/proc/self/environ",
)  # fmt: skip


def _path_cases(settings: Any) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(who, method, path, request kwargs) sending every path-like value to every route that
    takes a path, a dataset or a file name; the server's own folders are among the values."""
    own = [str(settings.data_dir.resolve()), str(settings.datasets.resolve()),
           str(settings.checkpoints.resolve()), str(settings.uploads.resolve())]  # fmt: skip
    values = [*PATH_LIKE, *own, *(f"{p}/../.." for p in own)]
    cases: list[tuple[str, str, str, dict[str, Any]]] = []
    for v in values:
        cases += [
            ("alice", "post", "/evaluations", {"data": {"dataset": v, **VALID_FORM}}),
            ("admin", "post", "/admin/models", {"data": {"path": v, "name": "evil"}}),
            ("admin", "post", "/admin/training",
             {"json": {"kind": "pretrain", "dataset": v, "name": "t-path"}}),
            ("alice", "post", "/certify",
             {"files": {"image": (v or "x", b"not an image", "image/png")}, "data": VALID_FORM}),
            ("alice", "post", "/evaluations",
             {"files": {"archive": (v or "x", b"not an archive")}, "data": VALID_FORM}),
            ("alice", "get", f"/jobs/{quote(v, safe='/')}", {}),
            ("alice", "get", f"/evaluations/{quote(v, safe='')}", {}),
        ]  # fmt: skip
    return cases


def test_no_answer_names_a_server_folder(service: Service, tmp_path: Path) -> None:
    """Issue 26 item 11: POST /evaluations dataset=../ answered "path '../' is outside the
    allowed folder /srv/.../datasets". Neither the hostile corpus nor any path-like input to any
    route may get an answer naming the data, dataset, checkpoint or model folder or the
    temporary folder."""
    settings = service.app.state.settings
    datasets = settings.datasets
    datasets.mkdir(parents=True, exist_ok=True)
    (datasets / "escape").symlink_to(tmp_path)  # a link inside leading outside
    (datasets / "notes.txt").write_text("a file, not a folder\n")
    (datasets / "empty").mkdir()  # a folder without class folders
    other = service.submit(service.bob, digit_png(0)).json()
    keys = {"alice": service.alice, "bob": service.bob, "admin": service.admin, "none": ""}
    requests = [(c.who, c.method, c.path, dict(c.kw)) for c in corpus(digit_png(1), other["url"])]
    requests += _path_cases(settings)
    secrets = {str(p) for p, _ in settings.private_folders()} | {str(tmp_path)}
    leaks = []
    for who, method, path, kw in requests:
        token = keys.get(who, who)
        headers = dict(kw.pop("headers", {}))
        if token:
            headers["X-API-Key"] = token
        r = getattr(service.client, method)(path, headers=headers, **kw)
        named = [s for s in secrets if s in r.text]
        if named or r.status_code >= 500:
            leaks.append((method, path, r.status_code, named, r.text[:300]))
    assert len(requests) > 200
    assert leaks == [], "\n".join(map(str, leaks))
