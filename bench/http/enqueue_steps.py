"""Where the CPU of a submission goes: POST /certify under concurrent clients, each step timed
with the CPU clock of the thread that runs it.

The API runs in this process (one process, as ``dmae-certify serve``) on a throw-away
PostgreSQL database and Redis, with no worker consuming; concurrent clients upload distinct
images (wrk when installed, else httpx clients in a second process). Each step of a
submission is wrapped with ``time.thread_time()``, so its figure is its own CPU under the same
contention as the whole, not a sample count: a step nested in another (the parts of
``submit``) is listed under it, and what no step covers (the event loop: HTTP, multipart,
FastAPI's parameters, the key, the rate limit, the hand-off to a thread) is the process's CPU
less the listed steps. Figures are per completed request, as in ``enqueue_bench.py``; with wrk a
step's calls come out a little above 1, for the requests still in flight when the load stops.
docs/PERFORMANCE.md ("Where a submission's CPU goes") explains it.

    .venv/bin/python -m bench.http.enqueue_steps                  # 50 clients, 10 s
    .venv/bin/python -m bench.http.enqueue_steps --clients 8 --seconds 20 --json steps.json
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import make_url

from bench.http import enqueue_bench as bench

# (module, attribute, label); a label starting with two spaces is a part of ``submit``.
STEPS = [
    ("app.routes.jobs", "read_upload", "read the upload"),
    ("domain.services.dispatching", "submit", "submit (all of it)"),
    ("domain.services.submissions", "resolve", "  check the parameters, choose the model"),
    ("domain.services.submissions", "decode_image", "  decode and preprocess the image"),
    ("domain.trust.signing", "seed_secret", "  the seed secret"),
    ("domain.services.submissions", "new_job", "  the job: seed, request key, rows"),
    ("domain.services.submissions", "insert_rows", "  INSERT the job and its input"),
    ("domain.services.submissions", "admit", "  admission: lock the key row, count"),
    ("domain.events", "job_changed", "  log line and metrics"),
    ("worker.celery_app", "CeleryDispatcher.certify", "publish to the broker"),
    ("app.routes.jobs", "job_out", "the response's model"),
    ("app.routes.jobs", "json_response", "the response's JSON"),
    ("domain.dispatch", "SentMarks.flush", "enqueued_at marks (a thread of their own)"),
]


class Clock:
    """CPU seconds and calls per step, from the thread clocks around each wrapped call."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._local = threading.local()

    def wrap(self, module: str, attribute: str, label: str) -> None:
        owner: Any = __import__(module, fromlist=["_"])
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)
        nested = label.startswith("  ")

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._local, "depth", 0)
            self._local.depth = depth + 1
            start = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                self._local.depth = depth
                if nested or depth == 0:  # a top step inside another is counted once
                    with self._lock:
                        spent = time.thread_time() - start
                        self.cpu[label] = self.cpu.get(label, 0.0) + spent
                        self.calls[label] += 1

        setattr(owner, name, timed)

    def reset(self) -> None:
        with self._lock:
            self.cpu.clear()
            self.calls.clear()


def httpx_load(base: str, keys: list[str], pngs: list[list[bytes]], go: Any, out: Any) -> None:
    """In a second process: the benchmark's httpx clients (uploads only)."""
    form = {"sigma": "0.25", "n": "1000"}
    go.set()
    out.put(asyncio.run(bench.load(base, "/certify", keys, pngs, form, polls=0)))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=10.0, help="wrk: seconds of uploads")
    parser.add_argument("--per-client", type=int, default=20, help="httpx: uploads per client")
    parser.add_argument("--keys", type=int, default=0, help="API keys (0: one per client)")
    parser.add_argument("--database", default=bench.DEFAULT_DATABASE, help="PostgreSQL admin URL")
    parser.add_argument("--broker", default=bench.DEFAULT_BROKER, help="Redis URL")
    parser.add_argument("--client", choices=("wrk", "httpx"), default=bench.default_client())
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    admin = make_url(args.database)
    name = f"dmae_steps_{uuid.uuid4().hex[:8]}"
    plain = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = admin.set(database=name).render_as_string(hide_password=False)
    folder = Path(tempfile.mkdtemp(prefix="dmae-steps-"))
    queue = f"dmae-steps-{uuid.uuid4().hex[:8]}"
    os.environ.update(
        {
            "DMAE_DATABASE_URL": url,
            "DMAE_BROKER_URL": args.broker,
            "DMAE_QUEUE": queue,
            "DMAE_DEVICE": "cpu",
            "DMAE_DATA_DIR": str(folder / "data"),
            "DMAE_RATE_LIMIT_REQUESTS": "10000000",  # counted per request, never reached
            "DMAE_MAX_ACTIVE_JOBS": str(10**9),  # no worker drains the queue here
        }
    )
    try:
        subprocess.run([bench.CLI, "db", "upgrade"], check=True, capture_output=True)
        keys = list(bench.make_keys(url, args.keys or args.clients).values())
        return measure(args, keys, folder / "wrk")
    finally:
        import redis

        redis.Redis.from_url(args.broker).delete(queue)
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(folder, ignore_errors=True)


def measure(args: argparse.Namespace, keys: list[str], folder: Path) -> int:
    """Serve the API in this process while :func:`load` drives it; print the figures."""
    import uvicorn

    from cli.asgi import create_app
    from domain.config import get_settings

    clock = Clock()
    for step in STEPS:
        clock.wrap(*step)
    server = uvicorn.Server(
        uvicorn.Config(create_app(get_settings()), port=bench.free_port(), log_level="warning")
    )
    base = f"http://127.0.0.1:{server.config.port}"
    total = args.clients * args.per_client
    pngs = bench.distinct_pngs(int(args.seconds * 800) if args.client == "wrk" else total + 50)
    result: dict[str, Any] = {}

    def drive() -> None:
        try:
            while not server.started:
                time.sleep(0.05)
            result.update(load(args, base, keys, pngs, clock, folder))
        finally:
            server.should_exit = True

    threading.Thread(target=drive, daemon=True).start()
    server.run()
    if "requests" not in result:
        print("the load did not finish", file=sys.stderr)
        return 1
    report(args, result, clock)
    return 0


def load(
    args: argparse.Namespace,
    base: str,
    keys: list[str],
    pngs: list[bytes],
    clock: Clock,
    folder: Path,
) -> dict[str, Any]:
    """Warm up, then load the API; the process's CPU and each step's over the same window."""
    form = {"sigma": "0.25", "n": "1000"}
    pid = os.getpid()
    if args.client == "wrk":
        items = [(bench.multipart(p, form), "/certify", keys[i % len(keys)])
                 for i, p in enumerate(pngs)]  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        bench.wrk_run(base, "POST", items[:50], 1, min(args.clients, 8), folder, pid)
        clock.reset()
        before = bench.cpu_seconds([pid])
        out = bench.wrk_run(base, "POST", items[50:], args.seconds, args.clients, folder, pid)
        cpu = bench.cpu_since(before, bench.cpu_seconds([pid]))
        requests = out["requests"]
        return {"requests": requests, "cpu": cpu, "rps": out["rps"], "p99": out["p99"],
                "errors": out["errors"]}  # fmt: skip
    spawn = multiprocessing.get_context("spawn")
    go, done = spawn.Event(), spawn.Queue()
    per = [pngs[50 + c :: args.clients][: args.per_client] for c in range(args.clients)]
    warm_go, warm_done = spawn.Event(), spawn.Queue()  # referenced until the child is done
    warm = spawn.Process(target=httpx_load, args=(base, keys[:1], [pngs[:20]], warm_go, warm_done))
    warm.start()
    warm_done.get(timeout=120)
    warm.join(120)
    child = spawn.Process(target=httpx_load, args=(base, keys[: args.clients], per, go, done))
    child.start()
    go.wait(120)
    clock.reset()
    before = bench.cpu_seconds([pid])
    out = done.get(timeout=600)
    cpu = bench.cpu_since(before, bench.cpu_seconds([pid]))
    child.join(60)
    errors = {f"POST {k}": v for k, v in out["errors"].items()}
    return {"requests": sum(len(p) for p in per), "cpu": cpu, "rps": out["post_rps"],
            "p99": out["post_p99"], "errors": errors}  # fmt: skip


def report(args: argparse.Namespace, result: dict[str, Any], clock: Clock) -> None:
    n = max(1.0, result["requests"])
    rows = []
    listed = 0.0
    for _module, _attribute, label in STEPS:
        cpu = clock.cpu.get(label, 0.0)
        rows.append({"step": label.strip(), "part_of_submit": label.startswith("  "),
                     "cpu_ms": cpu / n * 1e3, "calls": clock.calls.get(label, 0) / n})  # fmt: skip
        if not label.startswith("  "):
            listed += cpu
    rest = max(0.0, result["cpu"] - listed)
    print(
        f"{args.client}, {args.clients} clients, one API process on PostgreSQL + Redis: "
        f"{result['rps']:.1f} submissions/s, p99 {result['p99'] * 1e3:.0f} ms, "
        f"errors {result['errors'] or 'none'}"
    )
    print(f"CPU per submission: {result['cpu'] / n * 1e3:.2f} ms in the API process")
    for row in rows:
        indent = "    " if row["part_of_submit"] else "  "
        print(f"{row['cpu_ms']:8.3f} ms  {indent}{row['step']} ({row['calls']:.2f} calls)")
    print(f"{rest / n * 1e3:8.3f} ms    not in a step above (the event loop: HTTP, multipart, "
          "FastAPI's parameters, the key, the rate limit, thread hand-offs)")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "requests": n,
                    "rps": result["rps"],
                    "p99": result["p99"],
                    "errors": result["errors"],
                    "cpu_ms": result["cpu"] / n * 1e3,
                    "steps": rows,
                    "rest_ms": rest / n * 1e3,
                },
                indent=2,
            )  # fmt: skip
        )


if __name__ == "__main__":
    sys.exit(main())
