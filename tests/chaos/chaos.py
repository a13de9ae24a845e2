"""Chaos run of the production path: real Postgres, a private Redis, real Celery workers.

It submits JOBS certification jobs (small n) through the API while SIGKILLing workers and
restarting Redis (empty, as after a crash without persistence), then checks that

- every job reached a terminal state (none lost),
- each succeeded job has exactly one certificate and no other job has one (no duplicates),
- every certificate equals the clean result: ``models.smoothing.certify`` run directly with the
  same image, model, parameters and seed (so no redelivery re-rolled or corrupted anything).

Everything is on loopback, on resources this run creates (a dedicated database on the shared
Postgres server, a redis-server on a free port, worker processes) and removes afterwards; the run
is bounded by ``--timeout``. Usage (from the repository root)::

    nice .venv/bin/python tests/chaos/chaos.py --jobs 200 --kills 3 --redis-restarts 1

A reduced form runs in CI (tests/test_service_chaos.py).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # run as a script: the test helpers live in tests/
    sys.path.insert(0, str(TESTS))

from fault_support import BlockableDatabase, PrivateRedis, WorkerProcess  # noqa: E402
from service_support import (  # noqa: E402
    CORE_FIELDS,
    SIGMA,
    digit_png,
    make_checkpoint,
    service_settings,
)

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class ChaosConfig:
    jobs: int = 200
    kills: int = 3
    redis_restarts: int = 1
    workers: int = 2
    n0: int = 10
    n: int = 100
    images: int = 20
    max_attempts: int = 5  # above the kills, so no job may legitimately run out of attempts
    redis_down_s: float = 1.5
    timeout_s: float = 600.0
    submit_pause_s: float = 0.02


@dataclass
class ChaosReport:
    config: dict[str, Any]
    submitted: int = 0
    responses: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    lost: int = 0  # submitted but not terminal by the deadline (or no row at all)
    duplicates: int = 0  # jobs with more than one certificate, or a certificate when not succeeded
    missing_certificates: int = 0  # succeeded without a certificate
    mismatches: list[str] = field(default_factory=list)  # certificate != clean run's
    compared: int = 0
    kills: list[str] = field(default_factory=list)
    redis_restarts: int = 0
    queued_at_restart: int = 0  # queued jobs whose broker messages each Redis restart dropped
    redelivered: int = 0  # jobs that needed more than one attempt
    max_attempts_seen: int = 0
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicates == 0
            and self.missing_certificates == 0
            and not self.mismatches
            and self.statuses.get("succeeded", 0) == self.submitted
            and self.compared == self.submitted
        )

    def summary(self) -> str:
        lines = [
            f"jobs submitted        {self.submitted}",
            f"submit answers        {dict(sorted(self.responses.items()))}",
            f"final statuses        {dict(sorted(self.statuses.items()))}",
            f"jobs lost             {self.lost}",
            f"duplicate results     {self.duplicates}",
            f"missing certificates  {self.missing_certificates}",
            f"equal to clean run    {self.compared - len(self.mismatches)} of {self.compared}",
            f"worker SIGKILLs       {len(self.kills)} ({', '.join(self.kills)})",
            f"redis restarts        {self.redis_restarts} ({self.queued_at_restart} queued "
            "jobs' messages dropped)",
            f"jobs redelivered      {self.redelivered} (max attempts {self.max_attempts_seen})",
            f"wall time             {self.wall_s:.1f} s",
            f"result                {'OK' if self.ok else 'FAILED'}",
        ]
        return "\n".join(lines)


class Submitter(threading.Thread):
    """Submits the jobs one by one; a 503 (broker down) is retried until the API answers with
    the job (the retry finds the stored one: 200)."""

    def __init__(self, client: Any, key: str, cfg: ChaosConfig, pngs: list[bytes]):
        super().__init__(name="chaos-submitter", daemon=True)
        self.client, self.key, self.cfg, self.pngs = client, key, cfg, pngs
        self.ids: list[str] = []
        self.plan: list[tuple[int, int]] = []  # (image index, seed) per job
        self.responses: Counter[str] = Counter()
        self.error: str | None = None

    def run(self) -> None:
        try:
            for i in range(self.cfg.jobs):
                image, seed = i % self.cfg.images, 1000 + i
                self.plan.append((image, seed))
                self.ids.append(self._submit(image, seed))
                time.sleep(self.cfg.submit_pause_s)
        except Exception as exc:  # reported by the main thread
            self.error = f"{type(exc).__name__}: {exc}"

    def _submit(self, image: int, seed: int) -> str:
        form = {"sigma": str(SIGMA), "n0": str(self.cfg.n0), "n": str(self.cfg.n),
                "seed": str(seed)}  # fmt: skip
        for _ in range(200):
            r = self.client.post(
                "/certify",
                headers={"X-API-Key": self.key},
                files={"image": ("d.png", io.BytesIO(self.pngs[image]))},
                data=form,
            )
            self.responses[str(r.status_code)] += 1
            if r.status_code in (200, 202):
                return str(r.json()["id"])
            if r.status_code != 503:
                raise RuntimeError(f"unexpected answer {r.status_code}: {r.text[:300]}")
            time.sleep(0.25)
        raise RuntimeError("the API kept answering 503")


def _status_counts(db: Any) -> dict[str, int]:
    from sqlalchemy import func, select

    from domain.store.tables import Job

    with db.session() as s:
        return {
            k: int(v) for k, v in s.execute(select(Job.status, func.count()).group_by(Job.status))
        }


def _running_job(db: Any) -> tuple[str, int] | None:
    """(job id, pid of the process running it) from jobs.worker, preferring one drawing samples."""
    from sqlalchemy import select

    from domain.store.tables import Job

    with db.session() as s:
        row = s.execute(
            select(Job.id, Job.worker)
            .where(Job.status == "running")
            .order_by(Job.progress_done.desc(), Job.started_at.desc())
            .limit(1)
        ).first()
    if row is None or not row[1]:
        return None
    try:
        return str(row[0]), int(str(row[1]).split(":")[1])
    except (IndexError, ValueError):
        return None


def _finished_before_kill(db: Any, job_id: str) -> bool:
    from domain.store.tables import Job

    with db.session() as s:
        job = s.get(Job, job_id)
        return job is not None and job.status == "succeeded" and job.attempts == 1


def _kill_one(workers: list[WorkerProcess], db: Any, number: int, deadline: float) -> str:
    """SIGKILL the worker running a job: odd kills take the whole worker (parent and pool
    child, then it is restarted), even kills only the pool child (Celery redelivers).

    A job can finish between reading its row and the signal; a kill that hit no job in flight
    is made again on the next running job, so every counted kill interrupted a job."""
    while time.monotonic() < deadline:
        running = _running_job(db)
        pid = running[1] if running else None
        owner = next((w for w in workers if w.alive() and pid in w.pool_children(0)), None)
        if running is not None and owner is not None:
            if number % 2:
                owner.kill()
                owner.start()
                kind = "worker"
            else:
                owner.kill_child()
                kind = "pool child"
            if not _finished_before_kill(db, running[0]):
                return kind
        time.sleep(0.02)
    raise TimeoutError("no running job to kill before the deadline")


def clean_results(
    checkpoint: Path, pngs: list[bytes], plan: list[tuple[int, int]], cfg: ChaosConfig
) -> list[dict[str, Any]]:
    """Every job's certificate computed directly by the core (no service, no faults)."""
    from PIL import Image

    from models.checkpoints import load_classifier_with_meta
    from models.data import preprocess
    from models.smoothing import BatchSampler, certify

    model, meta = load_classifier_with_meta(checkpoint)
    sampler = BatchSampler(model, meta.num_classes, 64, "cpu")
    inputs = [preprocess(Image.open(io.BytesIO(p)), meta.input_size) for p in pngs]
    return [
        certify(sampler, inputs[image], SIGMA, cfg.n0, cfg.n, 0.001, seed).to_dict()
        for image, seed in plan
    ]


def run_chaos(cfg: ChaosConfig, workdir: Path | None = None, log: Any = print) -> ChaosReport:
    from fastapi.testclient import TestClient
    from sqlalchemy import func, select

    from cli.asgi import create_app
    from domain.keys import create_key
    from domain.store.tables import Certificate, Job

    started = time.monotonic()
    deadline = started + cfg.timeout_s
    report = ChaosReport(config=asdict(cfg))
    root = Path(workdir or tempfile.mkdtemp(prefix="dmae-chaos-"))
    data = root / "data"
    checkpoint = make_checkpoint(data / "checkpoints" / "tiny.safetensors")
    pngs = [digit_png(i) for i in range(cfg.images)]
    queue = f"dmae-chaos-{uuid.uuid4().hex[:8]}"

    with (
        BlockableDatabase(prefix="dmae_chaos") as database,
        PrivateRedis(log=root / "redis.log") as broker,
    ):
        env = {
            "DMAE_DEVICE": "cpu",
            "DMAE_BATCH_SIZE": "64",
            "DMAE_REGISTER_BUNDLED": "false",
            "DMAE_HEARTBEAT_S": "0.2",
            "DMAE_SWEEP_INTERVAL_S": "0.5",
            "DMAE_STALE_AFTER_S": "3",
            "DMAE_REQUEUE_AFTER_S": "3",
            "DMAE_UNSENT_GRACE_S": "1",
            "DMAE_MAX_ATTEMPTS": str(cfg.max_attempts),
            "DMAE_DATABASE_URL": database.url,
            "DMAE_BROKER_URL": broker.url,
            "DMAE_QUEUE": queue,
            "DMAE_DATA_DIR": str(data),
        }
        workers = [WorkerProcess(env, root, root / f"worker{i}.log") for i in range(cfg.workers)]
        for w in workers:
            w.start()
        settings = service_settings(
            data,
            database_url=database.url,
            broker_url=broker.url,
            queue=queue,
            max_attempts=cfg.max_attempts,
            max_active_jobs=0,
            rate_limit_requests=0,
        )
        app = create_app(settings)
        try:
            with TestClient(app) as client:
                db = app.state.db
                with db.session() as s:
                    admin, user = create_key(s, "admin", admin=True)[1], create_key(s, "chaos")[1]
                r = client.post("/admin/models", headers={"X-API-Key": admin},
                                data={"path": "tiny.safetensors", "default": "true"})  # fmt: skip
                assert r.status_code == 201, r.text
                submitter = Submitter(client, user, cfg, pngs)
                submitter.start()

                # Kills spread over the run, at fractions of the jobs finished; the Redis
                # restarts while submissions are still arriving.
                kill_at = [cfg.jobs * (k + 1) // (cfg.kills + 1) for k in range(cfg.kills)]
                restart_at = [
                    cfg.jobs * (k + 1) // (cfg.redis_restarts + 1)
                    for k in range(cfg.redis_restarts)
                ]
                while time.monotonic() < deadline:
                    counts = _status_counts(db)
                    done = sum(counts.get(s, 0) for s in TERMINAL)
                    if restart_at and len(submitter.ids) >= restart_at[0]:
                        restart_at.pop(0)
                        report.queued_at_restart += _status_counts(db).get("queued", 0)
                        broker.kill()
                        time.sleep(cfg.redis_down_s)
                        broker.start()
                        report.redis_restarts += 1
                        log(f"[{time.monotonic() - started:6.1f}s] redis restarted (empty)")
                    if kill_at and done >= kill_at[0]:
                        kill_at.pop(0)
                        kind = _kill_one(workers, db, len(report.kills) + 1, deadline)
                        report.kills.append(kind)
                        log(f"[{time.monotonic() - started:6.1f}s] SIGKILL {kind} ({done} done)")
                    submitted_all = not submitter.is_alive()
                    if submitted_all and not kill_at and not restart_at and done >= cfg.jobs:
                        break
                    if submitter.error:
                        raise RuntimeError(f"submission failed: {submitter.error}")
                    time.sleep(0.05)
                submitter.join(5)

                ids = submitter.ids
                report.submitted = len(ids)
                report.responses = dict(submitter.responses)
                with db.session() as s:
                    rows = {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}
                    certs: Counter[str] = Counter(
                        dict(
                            s.execute(
                                select(Certificate.job_id, func.count()).group_by(
                                    Certificate.job_id
                                )
                            ).all()
                        )
                    )
                    bodies = dict(s.execute(select(Certificate.job_id, Certificate.body)).all())
        finally:
            for w in workers:
                w.stop()

    statuses: Counter[str] = Counter()
    for job_id in ids:
        row = rows.get(job_id)
        status = row.status if row is not None else "missing"
        statuses[status] += 1
        if status not in TERMINAL:
            report.lost += 1
        n_certs = certs.get(job_id, 0)
        if n_certs > 1 or (n_certs and status != "succeeded"):
            report.duplicates += 1
        if status == "succeeded" and n_certs == 0:
            report.missing_certificates += 1
        if row is not None:
            report.max_attempts_seen = max(report.max_attempts_seen, row.attempts)
            report.redelivered += row.attempts > 1
    report.duplicates += len(ids) - len(set(ids))  # one job per submission, none shared
    report.statuses = dict(statuses)

    log(f"[{time.monotonic() - started:6.1f}s] computing the clean results with the core")
    clean = clean_results(checkpoint, pngs, submitter.plan[: len(ids)], cfg)
    for job_id, want in zip(ids, clean, strict=True):
        got = bodies.get(job_id)
        if got is None:
            continue
        report.compared += 1
        diff = [k for k in CORE_FIELDS if got.get(k) != want[k]]
        if diff:
            report.mismatches.append(f"{job_id}: {', '.join(diff)}")
    report.wall_s = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    cfg = ChaosConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=cfg.jobs)
    parser.add_argument("--kills", type=int, default=cfg.kills)
    parser.add_argument("--redis-restarts", type=int, default=cfg.redis_restarts)
    parser.add_argument("--workers", type=int, default=cfg.workers)
    parser.add_argument("--n0", type=int, default=cfg.n0)
    parser.add_argument("--n", type=int, default=cfg.n)
    parser.add_argument("--timeout", type=float, default=cfg.timeout_s, help="seconds")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    cfg = ChaosConfig(
        jobs=args.jobs,
        kills=args.kills,
        redis_restarts=args.redis_restarts,
        workers=args.workers,
        n0=args.n0,
        n=args.n,
        timeout_s=args.timeout,
    )
    workdir = Path(tempfile.mkdtemp(prefix="dmae-chaos-"))
    report = run_chaos(cfg, workdir)
    print(report.summary())
    if report.mismatches:
        print("mismatches:", *report.mismatches[:10], sep="\n  ")
    if report.ok:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"worker and redis logs kept in {workdir}")
    if args.json:
        args.json.write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
