"""The README's path for real: `dmae-certify keys create`, `dmae-certify serve` (uvicorn, embedded
runner, SQLite under the data folder), then upload an image over HTTP and poll the job."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from fault_support import free_port, terminate
from service_support import (  # noqa: F401 - tiny_checkpoint is a fixture
    SIGMA,
    assert_same_certificate,
    digit_png,
    reference,
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

    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [CLI, "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
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
    finally:
        terminate(proc)
        log.close()
    assert "No API key existed" not in (tmp_path / "serve.log").read_text()
    assert (tmp_path / "data" / "dmae.sqlite3").is_file()
