"""Case (d) of the benchmark: one certificate through the HTTP service, submit to done.

Runs against a service given by URL and API key, or starts the embedded one (``dmae-certify
serve`` with a throw-away SQLite data folder and a fresh admin key from ``dmae-certify keys
create``), registers the benchmark's own model in it (saved as a project checkpoint, added
through ``POST /admin/models``) and stops it afterwards. When the service commands are not
available the case is skipped with a note saying why; the other cases do not depend on it."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.modes import DEFAULT

DONE = ("succeeded", "failed", "cancelled")
MODEL_NAME = "bench-model"
CLI = ["-c", "import sys; from cli import main; sys.exit(main())"]


class ServiceUnavailable(Exception):
    """The service case cannot run here; the message says why (printed as the case's note)."""


def png_bytes(x: Tensor) -> bytes:
    """A (3, H, W) [0,1] tensor as an 8-bit RGB PNG, the form a client uploads."""
    from PIL import Image

    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    out = io.BytesIO()
    Image.fromarray(arr, "RGB").save(out, format="PNG")
    return out.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, *CLI, *args], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ServiceUnavailable(f"`dmae-certify {' '.join(args)}` failed: {' | '.join(tail)}")
    return proc.stdout


@contextmanager
def embedded_service(
    device: str,
    model: nn.Module,
    meta: Any,
    threads: int | None = None,
    startup_s: float = 180.0,
) -> Iterator[tuple[str, str, str]]:
    """Start the embedded service on a free local port with ``model`` registered in it.

    The model is saved as a project checkpoint into the service's checkpoint folder and
    registered through ``POST /admin/models``, so the service certifies with the very weights
    the other cases ran; ``threads`` sets its torch CPU threads (``OMP_NUM_THREADS``) like the
    benchmark's own. Yields (base URL, API key, registered model name).
    """
    import httpx

    from models.checkpoints import save_checkpoint

    data = Path(tempfile.mkdtemp(prefix="dmae-bench-"))
    env = dict(os.environ)
    for name in ("DMAE_DATABASE_URL", "DMAE_BROKER_URL"):
        env[name] = ""  # embedded mode: SQLite under the data folder, in-process runner
    env.update(
        DMAE_DATA_DIR=str(data), DMAE_CHECKPOINT_DIR=str(data / "checkpoints"),
        DMAE_DEVICE=device, DMAE_REGISTER_BUNDLED="false",
    )  # fmt: skip
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc: subprocess.Popen[bytes] | None = None
    try:
        save_checkpoint(data / "checkpoints" / "bench.safetensors", model, meta)
        _cli(["db", "upgrade"], env, data)
        printed = _cli(["keys", "create", "--admin", "--name", "bench"], env, data).split()
        if not printed:
            raise ServiceUnavailable("`dmae-certify keys create` printed no key")
        key = printed[-1]
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = data / "serve.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, *CLI, "serve", "--host", "127.0.0.1", "--port", str(port)],
                env=env, cwd=data, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").splitlines()[-3:]
                raise ServiceUnavailable(f"`dmae-certify serve` exited: {' | '.join(tail)}")
            try:
                if httpx.get(f"{url}/healthz", timeout=5).is_success:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"the service did not answer within {startup_s:.0f} s")
            time.sleep(0.25)
        r = httpx.post(
            f"{url}/admin/models", headers={"X-API-Key": key}, timeout=600,
            data={"path": "bench.safetensors", "name": MODEL_NAME},
        )  # fmt: skip
        if r.status_code != 201:
            raise ServiceUnavailable(f"POST /admin/models answered {r.status_code}: {r.text[:300]}")
        yield url, key, MODEL_NAME
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(data, ignore_errors=True)


def certify_over_http(
    url: str,
    api_key: str,
    image: bytes,
    *,
    sigma: float,
    alpha: float,
    n0: int,
    n: int,
    model: str | None = None,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """POST /certify, poll GET /jobs/{id} until done; returns wall time, enqueue time, the job.

    Polls every 20 ms at first, then every 2% of the time elapsed (at most 0.5 s): the
    measured time is at most ~2% late, and polling does not load the service it measures.
    """
    import httpx

    form: dict[str, Any] = {"sigma": sigma, "alpha": alpha, "n0": n0, "n": n, "mode": DEFAULT}
    if model:
        form["model"] = model
    with httpx.Client(base_url=url, headers={"X-API-Key": api_key}, timeout=60) as client:
        started = time.perf_counter()
        r = client.post("/certify", files={"image": ("bench.png", image, "image/png")}, data=form)
        enqueued = time.perf_counter() - started
        if r.status_code != 202:
            raise ServiceUnavailable(f"POST /certify answered {r.status_code}: {r.text[:300]}")
        job_id = r.json()["id"]
        while True:
            job = client.get(f"/jobs/{job_id}").json()
            if job.get("status") in DONE:
                break
            if time.perf_counter() - started > timeout_s:
                raise ServiceUnavailable(f"job {job_id} not done after {timeout_s:.0f} s")
            time.sleep(min(max(0.02, 0.02 * (time.perf_counter() - started)), 0.5))
        elapsed = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise ServiceUnavailable(f"job {job_id} {job['status']}: {job.get('error')}")
    return {"seconds": elapsed, "enqueue_s": enqueued, "job": job}
