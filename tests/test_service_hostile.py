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

import pytest
from fastapi.testclient import TestClient
from hostile_corpus import corpus, torch_pickle_exploit
from service_support import (  # noqa: F401 - tiny_checkpoint is a fixture
    digit_png,
    make_checkpoint,
    service_settings,
    tiny_checkpoint,
)
from sqlalchemy import func, select
from test_service_embedded import Recorder, Service

from app.main import create_app
from domain.tables import (
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
