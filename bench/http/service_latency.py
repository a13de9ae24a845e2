"""Measure the service's latencies over real HTTP (numbers quoted in docs/API.md).

1. End to end: POST /certify of one image, then GET /jobs/{id} every 20 ms until it succeeded;
   wall time from sending the POST to reading the certificate (median of --repeats runs, each
   a distinct seed so nothing is served from a stored certificate).
2. Enqueue: the round trip of POST /certify (upload, decode, validation, database insert, hand
   over to the runner or broker), median over --requests submissions with distinct seeds.

It starts ``dmae-certify serve`` on a free local port with a throw-away data folder: embedded
(SQLite + in-process runner) by default, or Postgres + Redis with --database and --broker (no
worker is started then, so the enqueue figure is the API's alone). Usage:

    python -m bench.http.service_latency [--model digits-s0.25|PATH] [--n 10000] [--requests 50]
    python -m bench.http.service_latency --database postgresql+psycopg://postgres@127.0.0.1/test \
        --broker redis://127.0.0.1:6379/13 --skip-e2e
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

CLI = str(Path(sys.executable).parent / "dmae-certify")


def digit_png(index: int) -> bytes:
    from PIL import Image

    from models.data import load_digits_split

    x, _, _ = load_digits_split("test")
    arr = (x[index].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def random_tiny(path: Path) -> None:
    """Stand-in when no bundled model is installed: the digits architecture, random weights."""
    import torch

    from models.checkpoints import CheckpointMeta, save_checkpoint
    from models.data import DIGITS_MEAN, DIGITS_STD
    from models.networks import DMAEClassifier, preset

    torch.manual_seed(0)
    arch = preset("tiny")
    model = DMAEClassifier(arch, 10, input_size=8, mean=DIGITS_MEAN, std=DIGITS_STD)
    meta = CheckpointMeta(
        kind="classifier",
        arch=arch,
        input_size=8,
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        num_classes=10,
        classes=[str(i) for i in range(10)],
        sigma=0.25,
        name="tiny-random-s0.25",
    )
    save_checkpoint(path, model, meta)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="digits-s0.25", help="bundled model name or checkpoint path")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--database", default="", help="Postgres URL (default: embedded SQLite)")
    p.add_argument("--broker", default="", help="Redis URL (default: embedded runner)")
    p.add_argument("--skip-e2e", action="store_true", help="only the enqueue measurement")
    return p.parse_args()


def install_model(model: str, ckpts: Path) -> str:
    """Put ``model`` (bundled name, file, else the random tiny stand-in) in CKPTS as
    ``model.safetensors``; returns how it is described in the output."""
    from models.checkpoints import bundled_models

    bundled = bundled_models()
    if model in bundled:
        shutil.copy(bundled[model], ckpts / "model.safetensors")
        return f"bundled {model}"
    if Path(model).is_file():
        shutil.copy(model, ckpts / "model.safetensors")
        return model
    random_tiny(ckpts / "model.safetensors")
    return f"{model} not installed: tiny preset (digits architecture), random weights"


def server_env(args: argparse.Namespace, data: Path) -> dict[str, str]:
    """The server's environment: DATA as its folder, a queue of its own, client seeds on."""
    return {
        **os.environ,
        "DMAE_DATA_DIR": str(data),
        "DMAE_REGISTER_BUNDLED": "false",
        "DMAE_DEVICE": "cpu",
        "DMAE_DATABASE_URL": args.database,
        "DMAE_BROKER_URL": args.broker,
        "DMAE_QUEUE": f"latency-{uuid.uuid4().hex[:8]}",
        "DMAE_ALLOW_CLIENT_SEED": "true",  # distinct seeds: nothing served from a stored job
    }


def wait_ready(http: httpx.Client) -> None:
    """Poll /readyz for up to 600 tries (every 0.1 s while the port refuses)."""
    for _ in range(600):
        try:
            if http.get("/readyz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)


def end_to_end(
    http: httpx.Client, h: dict[str, str], png: bytes, form: dict[str, str], repeats: int
) -> None:
    """Print the wall time (s) of POST /certify then polling GET /jobs/{id} every 20 ms until
    the job ends, median of ``repeats`` seeds, after one small warm-up job."""
    http.post(
        "/certify",
        headers=h,
        files={"image": ("w.png", png)},
        data={**form, "n": "100", "seed": "999999"},
    )  # warm-up
    time.sleep(1.0)
    e2e, runs = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        r = http.post(
            "/certify",
            headers=h,
            files={"image": ("d.png", png)},
            data={**form, "seed": str(i)},
        )
        url = r.json()["url"]
        while (job := http.get(url, headers=h).json())["status"] not in (
            "succeeded",
            "failed",
            "cancelled",
        ):
            time.sleep(0.02)
        e2e.append(time.perf_counter() - t0)
        runs.append(job["certificate"]["timings"])
    print(
        f"end to end, one certificate: median {statistics.median(e2e):.3f} s "
        f"(runs: {', '.join(f'{t:.3f}' for t in e2e)})"
    )
    t = runs[-1]
    print(
        f"  inside the job: selection {t['selection_s']:.3f} s, estimation "
        f"{t['estimation_s']:.3f} s, {t['samples_per_s']:.0f} samples/s, queued "
        f"{t['queued_s']:.3f} s"
    )


def enqueue(
    http: httpx.Client, h: dict[str, str], png: bytes, form: dict[str, str], requests: int
) -> None:
    """Print the median and p95 (ms) of ``requests`` POST /certify round trips (distinct
    seeds); the jobs are deleted afterwards."""
    times, ids = [], []
    for i in range(requests):
        t0 = time.perf_counter()
        r = http.post(
            "/certify",
            headers=h,
            files={"image": ("d.png", png)},
            data={**form, "seed": str(10_000 + i)},
        )
        times.append(time.perf_counter() - t0)
        assert r.status_code == 202, r.text
        ids.append(r.json()["url"])
    q = statistics.quantiles(times, n=20)
    print(
        f"enqueue (POST /certify round trip), {requests} requests: median "
        f"{statistics.median(times) * 1000:.1f} ms, p95 {q[-1] * 1000:.1f} ms"
    )
    for url in ids:
        http.delete(url, headers=h)


def measure(args: argparse.Namespace, port: int, key: str, what: str) -> None:
    """Register the model with the running server, then both measurements."""
    h = {"X-API-Key": key}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
        wait_ready(http)
        r = http.post("/admin/models", headers=h, data={"path": "model.safetensors"})
        r.raise_for_status()
        model = r.json()["name"]
        png = digit_png(0)
        form = {"model": model, "n0": str(args.n0), "n": str(args.n)}
        print(
            f"model: {what}; n0={args.n0} n={args.n}; "
            f"{'Postgres + Redis' if args.broker else 'embedded (SQLite + in-process runner)'}"
        )
        if not args.skip_e2e and not args.broker:
            end_to_end(http, h, png, form, args.repeats)
        enqueue(http, h, png, form, args.requests)


def main() -> int:
    args = parse_args()
    data = Path(tempfile.mkdtemp(prefix="dmae-latency-"))
    ckpts = data / "checkpoints"
    ckpts.mkdir(parents=True)
    what = install_model(args.model, ckpts)
    env = server_env(args, data)

    def cli(*a: str) -> str:
        out = subprocess.run([CLI, *a], env=env, capture_output=True, text=True, check=True)
        return out.stdout.strip()

    if args.database:
        cli("db", "upgrade")
    key = cli("keys", "create", "--admin", "--name", "latency")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(data / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [CLI, "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        measure(args, port, key, what)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
        if args.broker:
            import redis

            client = redis.Redis.from_url(args.broker)
            for k in client.scan_iter(f"*{env['DMAE_QUEUE']}*"):
                client.delete(k)
        shutil.rmtree(data, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
