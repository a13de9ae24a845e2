"""Throughput of one evaluation of N images against N single submissions of the same images
(numbers quoted in docs/PERFORMANCE.md, "Evaluations").

It starts ``dmae-certify serve`` (embedded: SQLite and the in-process runner, the bundled
digits models, CPU) on a free local port with a throw-away data folder, then, over real HTTP:

- evaluation: one ``POST /evaluations`` with a zip of the N images (an ImageFolder, folders
  named by the labels), then ``GET /evaluations/{id}`` every 0.2 s until it finished;
- singles: ``POST /certify`` for each of the N images, one after the other as fast as the
  server answers, then ``GET /jobs?status=...`` every 0.2 s until all N succeeded.

Both cases certify the same PNG files (the digits test images) with the same model and
parameters, and each run uses a fresh API key, so nothing is served from a stored certificate
(the no-re-roll identity is per client). The cases are interleaved and repeated (A B, B A,
A B, ...); each line gives images/s and noisy samples/s over the wall time from the first
request to the last certificate. Run it on a quiet machine, e.g.:

    OMP_NUM_THREADS=1 nice -n 15 python -m bench.http.evaluation_throughput --n 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx

CLI = str(Path(sys.executable).parent / "dmae-certify")
POLL_S = 0.2


def digit_pngs(count: int) -> list[tuple[int, bytes]]:
    """(label, PNG bytes) of the first ``count`` digits test images."""
    from PIL import Image

    from models.data import load_digits_split

    x, y, _ = load_digits_split("test")
    out = []
    for i in range(count):
        arr = (x[i].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        out.append((int(y[i]), buf.getvalue()))
    return out


def zipped(images: list[tuple[int, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for i, (label, png) in enumerate(images):
            z.writestr(f"{label}/{i:04d}.png", png)
    return out.getvalue()


def run_evaluation(
    http: httpx.Client, key: str, archive: bytes, form: dict[str, str]
) -> tuple[float, float]:
    """(wall seconds to the last certificate, seconds spent submitting)."""
    h = {"X-API-Key": key}
    t0 = time.perf_counter()
    r = http.post("/evaluations", headers=h, files={"archive": ("set.zip", archive)}, data=form)
    assert r.status_code == 202, r.text
    submitted = time.perf_counter() - t0
    url = r.json()["url"]
    while (ev := http.get(url, headers=h).json())["status"] in ("queued", "running"):
        time.sleep(POLL_S)
    assert ev["status"] == "succeeded", ev
    return time.perf_counter() - t0, submitted


def run_singles(
    http: httpx.Client, key: str, images: list[tuple[int, bytes]], form: dict[str, str]
) -> tuple[float, float]:
    """(wall seconds to the last certificate, seconds spent submitting)."""
    h = {"X-API-Key": key}
    t0 = time.perf_counter()
    for _, png in images:
        r = http.post("/certify", headers=h, files={"image": ("d.png", png)}, data=form)
        assert r.status_code == 202, r.text
    submitted = time.perf_counter() - t0

    def total(status: str) -> int:
        page = http.get("/jobs", headers=h, params={"status": status, "limit": 1}).json()
        return int(page["total"])

    while total("succeeded") < len(images):
        assert total("failed") == 0 and total("cancelled") == 0
        time.sleep(POLL_S)
    return time.perf_counter() - t0, submitted


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=360, help="digits test images (at most 360)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="digits-s0.25")
    p.add_argument("--out", default=None, help="also write the runs as JSON here")
    return p.parse_args()


def server_env(data: Path) -> dict[str, str]:
    """The embedded server's environment: DATA as its folder, CPU, no admission limits."""
    return {
        **os.environ,
        "DMAE_DATA_DIR": str(data),
        "DMAE_DEVICE": "cpu",
        "DMAE_DATABASE_URL": "",
        "DMAE_BROKER_URL": "",
        "DMAE_MAX_ACTIVE_JOBS": "0",  # the singles case queues all N at once, like the other
        "DMAE_RATE_LIMIT_REQUESTS": "0",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


def run_rounds(
    http: httpx.Client,
    args: argparse.Namespace,
    keys: list[str],
    images: list[tuple[int, bytes]],
    threads: str,
) -> list[dict[str, Any]]:
    """A warm-up, then ``--rounds`` rounds of both cases in alternating order, each with a
    fresh key from ``keys``; prints and returns one record per case and round."""
    for _ in range(600):
        try:
            if http.get("/readyz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    archive = zipped(images)
    form = {"model": args.model, "n0": str(args.n0), "n": str(args.n)}
    samples = args.images * (args.n0 + args.n)
    runs: list[dict[str, Any]] = []
    warm = {**form, "n": "100"}
    run_evaluation(http, keys.pop(), zipped(images[:8]), warm)  # load the model once
    cores = os.cpu_count()
    print(f"{args.images} digits test images, {args.model}, n0={args.n0} n={args.n} "
          f"({samples:,} noisy samples a case); embedded service, CPU, "
          f"OMP_NUM_THREADS={threads}, {cores} cores, "
          f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
    for r in range(args.rounds):
        order = ("evaluation", "singles") if r % 2 == 0 else ("singles", "evaluation")
        for case in order:
            k = keys.pop()
            if case == "evaluation":
                wall, submit_s = run_evaluation(http, k, archive, form)
            else:
                wall, submit_s = run_singles(http, k, images, form)
            runs.append({"round": r, "case": case, "wall_s": wall, "submit_s": submit_s,
                         "images_per_s": args.images / wall,
                         "samples_per_s": samples / wall})  # fmt: skip
            print(f"round {r + 1} {case:<10} {wall:7.1f} s  "
                  f"{args.images / wall:6.2f} images/s  {samples / wall:8.0f} samples/s  "
                  f"submitting {submit_s:5.2f} s  (load {os.getloadavg()[0]:.2f})",
                  flush=True)  # fmt: skip
    return runs


def print_summary(rounds: int, runs: list[dict[str, Any]]) -> None:
    """Each case's medians, and the wall-time ratio singles / evaluation of every round."""
    ratios = []
    for r in range(rounds):
        walls = {x["case"]: x["wall_s"] for x in runs if x["round"] == r}
        ratios.append(walls["singles"] / walls["evaluation"])
    for case in ("evaluation", "singles"):
        per = [x["images_per_s"] for x in runs if x["case"] == case]
        sps = [x["samples_per_s"] for x in runs if x["case"] == case]
        sub = [x["submit_s"] for x in runs if x["case"] == case]
        print(f"{case:<10} median {statistics.median(per):.2f} images/s, "
              f"{statistics.median(sps):.0f} samples/s, "
              f"submitting {statistics.median(sub):.2f} s")  # fmt: skip
    print("throughput evaluation / singles per round: "
          + ", ".join(f"{x:.2f}x" for x in ratios)
          + f" (median {statistics.median(ratios):.2f}x)")  # fmt: skip


def main() -> int:
    args = parse_args()
    data = Path(tempfile.mkdtemp(prefix="dmae-evalbench-"))
    env = server_env(data)

    def key() -> str:
        out = subprocess.run([CLI, "keys", "create"], env=env, capture_output=True, text=True,
                             check=True)  # fmt: skip
        return out.stdout.strip()

    subprocess.run([CLI, "db", "upgrade"], env=env, capture_output=True, check=True)
    keys = [key() for _ in range(2 * args.rounds + 1)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(data / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([CLI, "serve", "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    images = digit_pngs(args.images)
    runs: list[dict[str, Any]] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
            runs = run_rounds(http, args, keys, images, env["OMP_NUM_THREADS"])
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    print_summary(args.rounds, runs)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
