"""The README's path for real: `dmae-certify keys create`, `dmae-certify serve` (uvicorn, embedded
runner, SQLite under the data folder), then upload an image over HTTP and poll the job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
from service_support import (  # noqa: F401 - tiny_checkpoint and pg_url are fixtures
    SIGMA,
    assert_same_certificate,
    digit_png,
    pg_url,
    reference,
    serve_process,
    tiny_checkpoint,
    wait_for,
)

CLI = str(Path(sys.executable).parent / "dmae-certify")


def test_keys_serve_upload_poll(tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    env = {
        **os.environ,
        "DMAE_DATA_DIR": str(tmp_path / "data"),
        "DMAE_REGISTER_BUNDLED": "false",
        "DMAE_DEVICE": "cpu",
        "DMAE_BATCH_SIZE": "64",
    }
    for k in ("DMAE_DATABASE_URL", "DMAE_BROKER_URL"):
        env.pop(k, None)

    def cli(*args: str) -> str:
        out = subprocess.run([CLI, *args], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    admin = cli("keys", "create", "--admin", "--name", "ops")
    user = cli("keys", "create", "--name", "alice")
    assert admin.startswith("dmae_") and user.startswith("dmae_") and admin != user
    listing = cli("keys", "list")
    assert "ops" in listing and "alice" in listing and admin not in listing

    with (
        serve_process(tmp_path, env) as (base, _),
        httpx.Client(base_url=base, timeout=30) as http,
    ):
        r = http.post(
            "/admin/models", headers={"X-API-Key": admin}, data={"path": "tiny.safetensors"}
        )
        assert r.status_code == 201, r.text
        png = digit_png(7)
        r = http.post(
            "/certify",
            headers={"X-API-Key": user},
            files={"image": ("7.png", png)},
            data={"sigma": str(SIGMA), "n0": "20", "n": "300", "seed": "42"},
        )
        assert r.status_code == 202, r.text
        job = wait_for(http.get, r.json()["url"], user)
        assert job["status"] == "succeeded", job
        want = reference(
            tiny_checkpoint, png, sigma=SIGMA, alpha=0.001, n0=20, n=300, seed=42, batch_size=64
        )
        assert_same_certificate(job["certificate"], want)
        schema = http.get("/openapi.json").json()
        assert {
            "/certify",
            "/jobs/{job_id}",
            "/jobs",
            "/models",
            "/admin/models",
            "/admin/training",
        } <= set(schema["paths"])
    assert "No API key existed" not in (tmp_path / "serve.log").read_text()
    assert (tmp_path / "data" / "dmae.sqlite3").is_file()


def test_serve_workers_needs_a_broker(tmp_path: Path) -> None:
    """The embedded runner lives in the one API process: --workers 2 without a broker is
    refused with the reason, before anything starts."""
    env = {**os.environ, "DMAE_DATA_DIR": str(tmp_path / "data"), "DMAE_BROKER_URL": ""}
    env.pop("DMAE_DATABASE_URL", None)
    out = subprocess.run([CLI, "serve", "--workers", "2"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "--workers needs DMAE_BROKER_URL" in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_workers_share_one_metrics_view(tmp_path: Path, pg_url: str) -> None:  # noqa: F811
    """serve --workers 2 on Postgres + Redis: two API processes on one port, and GET /metrics
    from either adds up both (prometheus_client's multiprocess mode)."""
    import uuid

    from service_support import REDIS_URL, reset_postgres
    from test_metrics import samples, total

    from domain import migrate
    from domain.keys import create_key

    reset_postgres(pg_url)
    migrate.upgrade(pg_url)
    from domain.db import get_database

    with get_database(pg_url).session() as s:
        key = create_key(s, "w")[1]
    env = {
        **os.environ,
        "DMAE_DATA_DIR": str(tmp_path / "data"),
        "DMAE_DATABASE_URL": pg_url,
        "DMAE_BROKER_URL": REDIS_URL,
        "DMAE_QUEUE": f"dmae-test-{uuid.uuid4().hex[:10]}",
        "DMAE_DEVICE": "cpu",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with serve_process(tmp_path, env, "--workers", "2", "--log-level", "warning") as (base, _):
        h = {"X-API-Key": key}
        for i in range(6):
            r = httpx.post(f"{base}/certify", headers=h, files={"image": ("d.png", digit_png(i))},
                           data={"sigma": "0.25", "n": "100"}, timeout=30)  # fmt: skip
            assert r.status_code == 202, r.text
        seen = [
            total(samples(httpx.get(f"{base}/metrics", timeout=10).text), "dmae_jobs_total",
                  status="queued")
            for _ in range(6)
        ]  # fmt: skip
        assert seen == [6.0] * 6, seen  # whichever process answered, it counted both
