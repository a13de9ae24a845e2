"""Signed certificates, visible re-runs and replays in the embedded service (TestClient, SQLite,
in-process runner), and migration 0004 on SQLite and Postgres.

- Every certificate is signed where it is made and served byte for byte as signed (predict's
  timings lack selection_s: no null is added), and verifies with GET /keys (no key needed).
- prior_runs counts the client's earlier certificates for the same tensor and model, any seed or
  parameters; other clients, other images and replays do not count.
- The derived seed depends on the service's secret; client seeds are refused unless allowed.
- POST /jobs/{id}/replay re-runs a job with its seed: identical counts on the CPU, no second
  certificate; admin only; clear 404/409 answers.
- A rotated key signs the next certificate; earlier ones still verify.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
from service_support import (  # noqa: F401 - tiny_checkpoint, pg_url are fixtures
    OLD_KEY_AND_MODEL,
    SIGMA,
    database,
    digit_png,
    make_checkpoint,
    pg_url,
    reset_postgres,
    service_settings,
    tiny_checkpoint,
)
from sqlalchemy import func, select
from test_service_embedded import Service, service  # noqa: F401 - service is a fixture

from cli.asgi import create_app
from domain.config import Settings
from domain.store.tables import Certificate
from domain.trust import signing
from domain.trust.verification import verify_certificate


def _run(svc: Service, key: str, png: bytes, **form: str) -> dict[str, Any]:
    r = svc.submit(key, png, **form)
    assert r.status_code in (200, 202), r.text
    job = svc.wait(key, r.json()["url"])
    assert job["status"] == "succeeded", job
    return job


def _keys(svc: Service) -> dict[str, Any]:
    answer = svc.client.get("/keys")  # no API key needed
    assert answer.status_code == 200, answer.text
    return signing.load_public_keys(answer.text)


def _stored(svc: Service, job_id: str) -> dict[str, Any]:
    with svc.app.state.db.session() as s:
        body: dict[str, Any] = s.scalar(
            select(Certificate.body).where(Certificate.job_id == job_id)
        )
    return body


def test_certificates_are_signed_and_served_as_signed(service: Service) -> None:
    png = digit_png(0)
    keys = _keys(service)
    listed = service.client.get("/keys").json()
    assert listed["keys"][0]["current"] and "RFC 8785" in listed["canonicalization"]
    for mode in ("certify", "predict", "certify_top2"):
        job = _run(service, service.alice, png, mode=mode)
        cert = job["certificate"]
        assert cert == _stored(service, job["id"])  # nothing added or dropped on the way out
        assert cert["job_id"] == job["id"] and cert["schema"] == 2 and cert["version"]
        assert cert["seed_source"] == "derived" == job["seed_source"]
        assert cert["key_id"] in keys and cert["issued_at"].endswith("Z")
        verdict = verify_certificate(cert, public_keys=keys, image_bytes=png)
        assert verdict.valid, verdict.reason
    predict_job = service.client.get("/jobs?limit=3", headers=service.h(service.alice)).json()
    predict_cert = next(j["certificate"] for j in predict_job["items"] if j["mode"] == "predict")
    assert "selection_s" not in predict_cert["timings"]  # absent, not null: still verifies
    assert verify_certificate(predict_cert, public_keys=keys).valid


def _recoded(png: bytes) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(Image.open(io.BytesIO(png)))).save(buf, "PNG", compress_level=0)
    assert buf.getvalue() != png
    return buf.getvalue()


def test_prior_runs_shows_earlier_runs_of_the_same_input(service: Service) -> None:
    png = digit_png(1)
    first = _run(service, service.alice, png)
    assert first["certificate"]["prior_runs"] == 0
    second = _run(service, service.alice, png, n="300")  # other parameters: a new run
    assert second["certificate"]["prior_runs"] == 1
    third = _run(service, service.alice, _recoded(png), mode="predict")  # same pixels, new file
    assert third["certificate"]["prior_runs"] == 2
    again = service.submit(service.alice, png, n="300")  # identical: the stored job, no run
    assert again.status_code == 200 and again.json()["certificate"] == second["certificate"]
    assert _run(service, service.bob, png)["certificate"]["prior_runs"] == 0  # per client
    assert _run(service, service.alice, digit_png(2))["certificate"]["prior_runs"] == 0
    # A replay is a check, not a run of the client's: it is not counted either.
    replay = service.client.post(f"/jobs/{first['id']}/replay", headers=service.h(service.admin))
    assert replay.status_code == 202, replay.text
    service.wait(service.admin, replay.json()["url"])
    assert _run(service, service.alice, png, n="301")["certificate"]["prior_runs"] == 3
    assert _run(service, service.admin, png)["certificate"]["prior_runs"] == 0


def test_the_derived_seed_depends_on_the_services_secret(
    tmp_path: Path,
    tiny_checkpoint: Path,  # noqa: F811
) -> None:
    seeds = []
    for data in ("data", "other"):
        make_checkpoint(tmp_path / data / "checkpoints" / "tiny.safetensors")
        secret = tmp_path / f"{data}-secret"
        secret.write_text(f"the secret of service {data}\n")
        app = create_app(service_settings(tmp_path / data, seed_secret_file=str(secret)))
        with TestClient(app) as client:
            svc = Service(client, app, tiny_checkpoint)
            assert svc.register().status_code == 201
            seeds.append(svc.submit(svc.alice, digit_png(3)).json()["seed"])
            assert svc.submit(svc.bob, digit_png(3)).json()["seed"] == seeds[-1]
    assert seeds[0] != seeds[1]


def test_client_seeds_are_refused_unless_allowed(
    tmp_path: Path,
    tiny_checkpoint: Path,  # noqa: F811
) -> None:
    assert Settings(_env_file=None).client_seeds_allowed  # type: ignore[call-arg]
    broker = Settings(_env_file=None, broker_url="redis://x")  # type: ignore[call-arg]
    assert not broker.client_seeds_allowed
    app = create_app(service_settings(tmp_path / "data", allow_client_seed=False))
    with TestClient(app) as client:
        svc = Service(client, app, tiny_checkpoint)
        assert svc.register().status_code == 201
        png = digit_png(4)
        r = svc.submit(svc.alice, png, seed="123")
        assert r.status_code == 422 and "DMAE_ALLOW_CLIENT_SEED=true" in r.json()["detail"]
        job = _run(svc, svc.alice, png)
        same = svc.submit(svc.alice, png, seed=str(job["seed"]))  # the revealed derived seed
        assert same.status_code == 200 and same.json()["id"] == job["id"]
    app = create_app(service_settings(tmp_path / "data", allow_client_seed=True))
    with TestClient(app) as client:
        svc = Service(client, app, tiny_checkpoint)
        chosen = _run(svc, svc.alice, digit_png(4), seed="123")
        assert chosen["seed"] == 123 and chosen["certificate"]["seed_source"] == "client"
        r = svc.submit(svc.alice, digit_png(4), seed=str(2**53))
        assert r.status_code == 422 and "seed must lie in [0, 2^53)" in r.json()["detail"]


def test_replay_gives_identical_counts_and_no_second_certificate(service: Service) -> None:
    original = _run(service, service.alice, digit_png(5), mode="certify_top2")
    before = service.certificates()
    h = service.h(service.admin)
    r = service.client.post(f"/jobs/{original['id']}/replay", headers=h)
    assert r.status_code == 202, r.text
    queued = r.json()
    assert queued["replay_of"] == original["id"] and queued["seed"] == original["seed"]
    replay = service.wait(service.admin, queued["url"])
    assert replay["status"] == "succeeded" and replay["certificate"] is None
    found = replay["replay"]
    assert found["identical"] and found["same_device_kind"] and found["device"] == "cpu"
    assert found["counts"] == original["certificate"]["counts"] == found["original_counts"]
    assert found["radius"] == original["certificate"]["radius"]
    assert service.certificates() == before
    after = service.client.get(original["url"], headers=service.h(service.alice)).json()
    assert after["certificate"] == original["certificate"]
    # Admin only; unknown jobs, jobs with no certificate and replays of replays are refused.
    assert service.client.post(f"/jobs/{original['id']}/replay",
                               headers=service.h(service.alice)).status_code == 403  # fmt: skip
    assert service.client.post("/jobs/nope/replay", headers=h).status_code == 404
    again = service.client.post(f"/jobs/{replay['id']}/replay", headers=h)
    assert again.status_code == 409 and "itself a replay" in again.json()["detail"]
    big = service.submit(service.alice, digit_png(6), n="100000", n0="10").json()
    service.client.delete(big["url"], headers=service.h(service.alice))
    none = service.client.post(f"/jobs/{big['id']}/replay", headers=h)
    assert none.status_code == 409 and "no certificate to replay" in none.json()["detail"]


def test_a_rotated_key_signs_the_next_certificate(service: Service) -> None:
    png = digit_png(7)
    old = _run(service, service.alice, png)["certificate"]
    settings = service.app.state.settings
    old_id, new_id = signing.rotate_signing_key(settings)
    assert old_id == old["key_id"] != new_id
    new = _run(service, service.alice, png, n="250")["certificate"]
    assert new["key_id"] == new_id
    listed = service.client.get("/keys").json()["keys"]
    assert [(k["key_id"], k["current"]) for k in listed] == [(new_id, True), (old_id, False)]
    keys = _keys(service)
    assert verify_certificate(old, public_keys=keys).valid
    assert verify_certificate(new, public_keys=keys).valid


def test_serve_stops_with_a_clear_message_when_the_key_file_is_missing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMAE_")}
    env.update(DMAE_DATA_DIR=str(tmp_path / "data"), DMAE_SIGNING_KEY=str(tmp_path / "gone.pem"))
    cli = str(Path(sys.executable).parent / "dmae-certify")
    out = subprocess.run([cli, "serve"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"DMAE_SIGNING_KEY names {tmp_path / 'gone.pem'}, which does not exist" in out.stderr
    rotate = subprocess.run([cli, "keys", "rotate-signing"], env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert rotate.returncode == 2 and "replace that file" in rotate.stderr


# ---------------------------------------------------------------- migration 0004


def test_migration_0004_keeps_jobs_inputs_and_certificates(database: str) -> None:
    import sqlalchemy as sa

    from domain.store import migrate
    from domain.store.db import make_engine

    migrate.upgrade(database, "0003")
    engine = make_engine(database)
    body = {"radius": 0.5, "counts": [1, 2]}
    with engine.begin() as conn:
        for statement in OLD_KEY_AND_MODEL:
            conn.execute(sa.text(statement))
        conn.execute(sa.text(
            "INSERT INTO jobs (id, owner_id, request_key, mode, checkpoint_id, model_name, sigma, "
            "alpha, n0, n, seed, input_sha256, tensor_sha256, input_record, input_shape, status, "
            "progress_done, progress_total, attempts, created_at) VALUES ('j', 1, 'k', "
            "'certify', 1, 'm', 0.25, 0.001, 100, 1000, 7, 'b', 't', '{}', '[3, 8, 8]', "
            "'succeeded', 0, 0, 1, CURRENT_TIMESTAMP)"
        ))  # fmt: skip
        conn.execute(sa.text(
            "INSERT INTO job_inputs (job_id, shape, data) VALUES ('j', '[3, 8, 8]', :d)"
        ), {"d": b"\x00" * 768})  # fmt: skip
        conn.execute(
            sa.text(
                "INSERT INTO certificates (job_id, abstained, radius, body, created_at) "
                "VALUES ('j', false, 0.5, :b, CURRENT_TIMESTAMP)"
            ),
            {"b": json.dumps(body)},
        )

    def rows() -> tuple[int, int, int, Any]:
        with engine.connect() as conn:
            counts = conn.execute(sa.text(
                "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM job_inputs), "
                "(SELECT count(*) FROM certificates)"
            )).one()  # fmt: skip
            stored = conn.execute(sa.text("SELECT body FROM certificates")).scalar_one()
        return int(counts[0]), int(counts[1]), int(counts[2]), stored

    migrate.upgrade(database)
    with engine.connect() as conn:
        job = conn.execute(sa.text("SELECT seed_source, replay_of, replay_result FROM jobs")).one()
    assert tuple(job) == ("", None, None)
    jobs, inputs, certificates, stored = rows()
    assert (jobs, inputs, certificates) == (1, 1, 1)
    assert (json.loads(stored) if isinstance(stored, str) else stored) == body
    migrate.downgrade(database, "0003")
    with engine.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("jobs")}
    assert not {"seed_source", "replay_of", "replay_result"} & columns
    assert rows()[:3] == (1, 1, 1)
    engine.dispose()


def test_certificates_count_is_per_job(service: Service) -> None:
    """One certificate per job still holds after replays (the unique job_id constraint)."""
    job = _run(service, service.alice, digit_png(8))
    for _ in range(2):
        r = service.client.post(f"/jobs/{job['id']}/replay", headers=service.h(service.admin))
        service.wait(service.admin, r.json()["url"])
    with service.app.state.db.session() as s:
        per_job = s.execute(
            select(Certificate.job_id, func.count()).group_by(Certificate.job_id)
        ).all()
    assert [n for _, n in per_job] == [1]
