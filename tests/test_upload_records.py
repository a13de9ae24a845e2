"""Issue 26, item 5: one job per tensor, but each upload keeps its own record.

An animated WebP sent after its first frame as a PNG reaches the PNG's job (same tensor); the
answer to it, ``GET`` of the job as that upload sees it, the page's view and evaluation rows
must still say "only frame 1 of 2 is certified" (and the PNG's must not). Also migration 0009
on SQLite and PostgreSQL with rows in place.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_support import (  # noqa: F401 - pg_url and tiny_checkpoint are fixtures
    OLD_KEY_AND_MODEL,
    digit_png,
    pg_url,
    reset_postgres,
    service_settings,
    tiny_checkpoint,
)
from sqlalchemy import func, select
from test_evaluations import finished, read_tsv_text, zipped
from test_service_embedded import Service

from cli.asgi import create_app
from domain.store.tables import Job, JobUpload

FRAME = "only frame 1 of 2 is certified"


def animated_webp() -> tuple[bytes, bytes]:
    """(a 2-frame lossless WebP whose first frame is digit 0, that frame as a PNG)."""
    first = Image.open(io.BytesIO(digit_png(0))).convert("RGB")
    second = Image.open(io.BytesIO(digit_png(1))).convert("RGB")
    webp = io.BytesIO()
    first.save(webp, "WEBP", save_all=True, append_images=[second], lossless=True)
    return webp.getvalue(), digit_png(0)


@pytest.fixture
def service(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Service]:  # noqa: F811
    app = create_app(service_settings(tmp_path / "data", runner_threads=2))
    with TestClient(app) as client:
        svc = Service(client, app, tiny_checkpoint)
        assert svc.register().status_code == 201
        yield svc


def _frame_warned(out: dict[str, Any]) -> bool:
    return any(FRAME in w for w in out["warnings"])


def test_a_reupload_carries_its_own_warnings_and_preprocessing(service: Service) -> None:
    svc, key = service, service.alice
    webp, png = animated_webp()
    first = svc.submit(key, png)
    assert first.status_code == 202, first.text
    assert not _frame_warned(first.json())
    done = svc.wait(key, first.json()["url"])
    assert done["status"] == "succeeded"

    again = svc.submit(key, webp)  # the same tensor: the same job, no new noise
    assert again.status_code == 200, again.text
    out = again.json()
    assert out["id"] == first.json()["id"] and out["tensor_sha256"] == done["tensor_sha256"]
    assert _frame_warned(out), out["warnings"]
    assert "frame 1 of 2" in out["preprocessing"] and out["preprocessing"][0].startswith(
        "decode WEBP"
    )
    assert out["input_sha256"] != done["input_sha256"]
    assert out["url"] == f"/jobs/{out['id']}?upload={out['input_sha256']}"
    assert out["certificate"] == done["certificate"]  # the one signed certificate, unchanged

    seen = svc.client.get(out["url"], headers=svc.h(key)).json()
    assert _frame_warned(seen) and seen["input_sha256"] == out["input_sha256"]
    own = svc.client.get(f"/jobs/{out['id']}", headers=svc.h(key)).json()
    assert not _frame_warned(own) and own["input_sha256"] == done["input_sha256"]
    assert (
        svc.client.get(f"{first.json()['url']}?upload={'0' * 64}", headers=svc.h(key)).status_code
        == 404
    )
    assert svc.client.get(f"{first.json()['url']}?upload=x", headers=svc.h(key)).status_code == 422
    # Another key does not see the job, nor its uploads.
    assert svc.client.get(out["url"], headers=svc.h(svc.bob)).status_code == 404

    # The PNG again: its own (the job's) record; the WebP again: one row, not two.
    assert not _frame_warned(svc.submit(key, png).json())
    assert _frame_warned(svc.submit(key, webp).json())
    with svc.app.state.db.session() as s:
        assert s.scalar(select(func.count()).select_from(JobUpload)) == 1
        assert s.scalar(select(func.count()).select_from(Job)) == 1


def test_the_other_order_and_an_idempotent_replay(service: Service) -> None:
    svc, key = service, service.alice
    webp, png = animated_webp()
    first = svc.submit(key, webp)
    assert first.status_code == 202 and _frame_warned(first.json())
    second = svc.client.post(
        "/certify", headers={**svc.h(key), "Idempotency-Key": "k-1"},
        files={"image": ("d.png", png)}, data={"sigma": "0.25", "n0": "20", "n": "200"},
    )  # fmt: skip
    assert second.json()["id"] == first.json()["id"] and not _frame_warned(second.json())
    replay = svc.client.post(
        "/certify", headers={**svc.h(key), "Idempotency-Key": "k-1"},
        files={"image": ("d.png", png)}, data={"sigma": "0.25", "n0": "20", "n": "200"},
    )  # fmt: skip
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert replay.json()["warnings"] == second.json()["warnings"]
    assert replay.json()["url"] == second.json()["url"] != first.json()["url"]  # the PNG's view


def test_evaluation_rows_carry_each_files_own_warnings(service: Service) -> None:
    svc, key = service, service.alice
    webp, png = animated_webp()
    archive = zipped({"digit-0/a.png": png, "digit-0/b.webp": webp})
    r = svc.client.post(
        "/evaluations", headers=svc.h(key), files={"archive": ("set.zip", archive)},
        data={"sigma": "0.25", "n0": "20", "n": "200"},
    )  # fmt: skip
    assert r.status_code == 202, r.text
    ev = finished(svc, key, r.json()["url"])
    assert ev["status"] == "succeeded"
    rows = read_tsv_text(svc.client.get(ev["results_url"], headers=svc.h(key)))
    by_name = {row.name: row for row in rows}
    assert by_name["digit-0/a.png"].tensor_sha256 == by_name["digit-0/b.webp"].tensor_sha256
    assert not any(FRAME in w for w in by_name["digit-0/a.png"].warnings)
    assert any(FRAME in w for w in by_name["digit-0/b.webp"].warnings)


# ---------------------------------------------------------------- migration 0009


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.sqlite3'}"
    url: str = request.getfixturevalue("pg_url")
    reset_postgres(url)
    return url


def test_migration_0009_keeps_jobs_and_evaluation_items(database: str) -> None:
    import sqlalchemy as sa

    from domain.store import migrate
    from domain.store.db import make_engine

    migrate.upgrade(database, "0008")
    engine = make_engine(database)
    statements = [
        *OLD_KEY_AND_MODEL,
        "INSERT INTO jobs (id, owner_id, request_key, mode, checkpoint_id, model_name, sigma, "
        "alpha, n0, n, seed, input_sha256, tensor_sha256, input_record, input_shape, status, "
        "progress_done, progress_total, attempts, created_at, seed_source) VALUES ('j', 1, "
        "'k', 'certify', 1, 'm', 0.25, 0.001, 100, 1000, 7, 'b', 't', "
        "'{\"warnings\": [\"w\"]}', '[3, 8, 8]', 'succeeded', 0, 0, 1, CURRENT_TIMESTAMP, "
        "'derived')",
        "INSERT INTO evaluations (id, owner_id, source, mode, checkpoint_id, model_name, "
        "classes, sigma, alpha, n0, n, skip, total, created_at) VALUES ('e', 1, "
        "'digits:test', 'certify', 1, 'm', '[]', 0.25, 0.001, 100, 1000, 1, 1, "
        "CURRENT_TIMESTAMP)",
        "INSERT INTO evaluation_items (evaluation_id, position, idx, name, label, job_id) "
        "VALUES ('e', 0, 0, 'digits:0', 7, 'j')",
    ]
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))

    def rows() -> list[Any]:
        with engine.connect() as conn:
            return [
                tuple(conn.execute(sa.text("SELECT id, input_record FROM jobs")).one()),
                tuple(conn.execute(sa.text("SELECT job_id, name FROM evaluation_items")).one()),
            ]

    before = rows()
    migrate.upgrade(database)
    assert rows() == before
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT input_sha256 FROM evaluation_items")).scalar() is None
        conn.execute(sa.text(
            "INSERT INTO job_uploads (job_id, input_sha256, input_record, created_at) "
            "VALUES ('j', 'c', '{}', CURRENT_TIMESTAMP)"
        ))  # fmt: skip
    migrate.downgrade(database, "0008")
    with engine.connect() as conn:
        assert "job_uploads" not in set(sa.inspect(conn).get_table_names())
    assert rows() == before
    migrate.upgrade(database)
    assert rows() == before
    engine.dispose()
