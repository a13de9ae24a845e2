"""Faults injected for real (tests/fault_support.py): the database going away, the broker
crashing, a worker process SIGKILLed mid-job, a model that cannot be loaded.

The broker is a private redis-server on its own port and the database a dedicated Postgres
database: the shared services are never touched.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fault_support import BlockableDatabase, PrivateRedis, WorkerProcess, children
from service_support import (
    SIGMA,
    assert_same_certificate,
    digit_png,
    make_checkpoint,
    reference,
    service_settings,
    wait_for,
)
from sqlalchemy import func, select
from test_service_embedded import Service

from cli.asgi import create_app
from domain.store.tables import Certificate, Job

MAX_ATTEMPTS = 2
WORKER_ENV = {
    "DMAE_DEVICE": "cpu",
    "DMAE_BATCH_SIZE": "64",
    "DMAE_REGISTER_BUNDLED": "false",
    "DMAE_HEARTBEAT_S": "0.2",
    "DMAE_SWEEP_INTERVAL_S": "0.5",
    "DMAE_STALE_AFTER_S": "3",
    "DMAE_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    "DMAE_REQUEUE_AFTER_S": "2",
    "DMAE_UNSENT_GRACE_S": "1",
    "DMAE_RATE_LIMIT_REQUESTS": "0",
}
LONG = {"n0": "20", "n": "3000"}  # a few seconds of sampling on a shared CPU


def _certificates(app: Any, job_id: str) -> int:
    with app.state.db.session() as s:
        return int(
            s.scalar(
                select(func.count()).select_from(Certificate).where(Certificate.job_id == job_id)
            )
            or 0
        )


def _reference(svc: Service, png: bytes, job: dict[str, Any], n0: int, n: int) -> dict[str, Any]:
    return reference(
        svc.checkpoint, png, sigma=SIGMA, alpha=0.001, n0=n0, n=n, seed=job["seed"], batch_size=64
    )


@pytest.fixture(scope="module")
def celery_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A dedicated Postgres database, a private Redis and a prefork Celery worker process."""
    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    checkpoint = make_checkpoint(data / "checkpoints" / "tiny.safetensors")
    queue = f"dmae-fault-{uuid.uuid4().hex[:8]}"
    with BlockableDatabase() as db, PrivateRedis(log=root / "redis.log") as broker:
        env = {
            **WORKER_ENV,
            "DMAE_DATABASE_URL": db.url,
            "DMAE_BROKER_URL": broker.url,
            "DMAE_QUEUE": queue,
            "DMAE_DATA_DIR": str(data),
        }
        worker = WorkerProcess(env, root, root / "worker.log")
        worker.start()
        try:
            yield {
                "db": db,
                "broker": broker,
                "worker": worker,
                "data": data,
                "checkpoint": checkpoint,
                "queue": queue,
            }
        finally:
            worker.stop()


@pytest.fixture
def api(celery_stack: dict[str, Any]) -> Iterator[Service]:
    settings = service_settings(
        celery_stack["data"],
        database_url=celery_stack["db"].url,
        broker_url=celery_stack["broker"].url,
        queue=celery_stack["queue"],
        max_attempts=MAX_ATTEMPTS,
        rate_limit_requests=0,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        svc = Service(client, app, celery_stack["checkpoint"])
        assert svc.register().status_code in (201, 409)
        yield svc


def _wait(svc: Service, url: str, stack: dict[str, Any], **kw: Any) -> dict[str, Any]:
    try:
        return wait_for(svc.client.get, url, svc.alice, **kw)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nworker log:\n{stack['worker'].tail()}") from None


def _running(svc: Service, url: str, stack: dict[str, Any], attempts: int) -> dict[str, Any]:
    """Wait until the job runs its ``attempts``-th attempt and has drawn samples."""
    import time

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = svc.client.get(url, headers=svc.h(svc.alice)).json()
        if job["status"] == "running" and job["attempts"] == attempts and job["progress"]["done"]:
            return job
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.05)
    raise AssertionError(f"job never ran attempt {attempts}:\n{stack['worker'].tail()}")


def test_model_that_fails_to_load_fails_the_job_and_the_worker_survives(
    api: Service, celery_stack: dict[str, Any]
) -> None:
    folder = celery_stack["checkpoint"].parent
    broken = make_checkpoint(folder / "broken.safetensors", name="broken", sigma=0.5)
    data = bytearray(broken.read_bytes())
    data[-64:] = bytes(64)  # weights damaged at rest; header and metadata intact
    broken.write_bytes(bytes(data))
    assert api.register("broken.safetensors").status_code == 201
    pid = celery_stack["worker"].pid
    job = api.submit(api.alice, digit_png(0), model="broken").json()
    failed = _wait(api, job["url"], celery_stack)
    assert failed["status"] == "failed", failed
    assert "model 'broken' could not be loaded" in failed["error"]
    assert failed["certificate"] is None and _certificates(api.app, job["id"]) == 0
    # The same worker process goes on serving a good model.
    ok = _wait(api, api.submit(api.alice, digit_png(0), seed="3").json()["url"], celery_stack)
    assert ok["status"] == "succeeded" and celery_stack["worker"].pid == pid
    assert celery_stack["worker"].alive()


def _has_torch(pid: int) -> bool:
    """Whether process ``pid`` has torch's library mapped (it imported torch)."""
    return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()


def test_a_new_pool_process_inherits_the_job_code(celery_stack: dict[str, Any]) -> None:
    """The main worker process imports the job code (torch, the models, the engine) before its
    pool forks, so a replacement pool process is up at once. Before, each new one imported it
    after the fork (5 s on this machine), past Celery's 4 s deadline to report itself up: Celery
    killed it and forked another, 15 times in a row in one run, while the job waited."""
    worker: WorkerProcess = celery_stack["worker"]
    first = worker.pool_children()
    assert first and _has_torch(worker.pid)
    worker.kill_child()
    deadline = time.monotonic() + 300
    while not (fresh := [c for c in children(worker.pid) if c not in first]):
        assert time.monotonic() < deadline, "no new pool process"
        time.sleep(0.1)
    assert _has_torch(fresh[0])  # inherited at the fork, not imported since
    assert "Timed out waiting for UP" not in worker.log_path.read_text()


def test_worker_killed_mid_job_completes_exactly_once(
    api: Service, celery_stack: dict[str, Any]
) -> None:
    png = digit_png(1)
    job = api.submit(api.alice, png, seed="41", **LONG).json()
    _running(api, job["url"], celery_stack, attempts=1)
    celery_stack["worker"].kill_child()  # SIGKILL the process running the job
    done = _wait(api, job["url"], celery_stack, timeout=120)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert _certificates(api.app, job["id"]) == 1
    assert_same_certificate(done["certificate"], _reference(api, png, done, 20, 3000))
    assert celery_stack["worker"].alive()


def test_worker_killed_at_every_attempt_fails_clearly(
    api: Service, celery_stack: dict[str, Any]
) -> None:
    job = api.submit(api.alice, digit_png(2), seed="42", **LONG).json()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        _running(api, job["url"], celery_stack, attempts=attempt)
        celery_stack["worker"].kill_child()
    failed = _wait(api, job["url"], celery_stack, timeout=300)
    assert failed["status"] == "failed" and failed["certificate"] is None
    assert f"gave up after {MAX_ATTEMPTS} attempts" in failed["error"]
    assert _certificates(api.app, job["id"]) == 0


def test_broker_down_is_503_and_the_stored_job_runs_when_it_returns(
    api: Service, celery_stack: dict[str, Any]
) -> None:
    broker: PrivateRedis = celery_stack["broker"]
    png = digit_png(3)
    broker.kill()
    try:
        r = api.submit(api.alice, png, seed="43")
        assert r.status_code == 503, r.text
        body = r.json()
        assert "job queue is unavailable" in body["detail"] and r.headers["Retry-After"]
        with api.app.state.db.session() as s:
            row = s.get(Job, body["id"])
            assert row is not None and row.status == "queued" and row.enqueued_at is None
        # The client's retry finds the stored job: no second job, no second message.
        again = api.submit(api.alice, png, seed="43")
        assert again.status_code == 200 and again.json()["id"] == body["id"]
        assert api.client.get("/jobs", headers=api.h(api.alice)).status_code == 200
    finally:
        broker.start()  # empty, like a crashed Redis without persistence
    done = _wait(api, f"/jobs/{body['id']}", celery_stack, timeout=120)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert _certificates(api.app, body["id"]) == 1


def test_database_outage_is_503_and_the_service_recovers(tmp_path: Path) -> None:
    """Embedded service on a Postgres database that goes away (connections refused and cut)
    while a job runs: every request gets 503 with a clear body, /healthz stays up, and when
    the database returns everything works again and the job completes exactly once."""
    checkpoint = make_checkpoint(tmp_path / "data" / "checkpoints" / "tiny.safetensors")
    with BlockableDatabase() as db:
        settings = service_settings(
            tmp_path / "data",
            database_url=db.url,
            stale_after_s=2,
            heartbeat_s=0.2,
            sweep_interval_s=0.5,
            rate_limit_requests=0,
        )
        app = create_app(settings)
        with TestClient(app) as client:
            svc = Service(client, app, checkpoint)
            assert svc.register().status_code == 201
            png = digit_png(4)
            first = wait_for(client.get, svc.submit(svc.alice, png).json()["url"], svc.alice)
            assert first["status"] == "succeeded"
            inflight = svc.submit(svc.alice, png, seed="44", n0="20", n="3000").json()
            wait_for(client.get, inflight["url"], svc.alice, until=("running",))

            db.block()
            try:
                calls = [
                    ("get", first["url"], {}),
                    ("get", "/jobs", {}),
                    ("get", "/models", {}),
                    ("get", "/readyz", {}),
                    ("post", "/certify", {"files": {"image": ("d.png", png)},
                                          "data": {"sigma": "0.25", "seed": "45"}}),
                ]  # fmt: skip
                for method, url, kw in calls:
                    r = getattr(client, method)(url, headers=svc.h(svc.alice), **kw)
                    assert r.status_code == 503, (url, r.text)
                    assert r.json() == {"detail": "the database is unavailable; retry shortly"}
                    assert r.headers["Retry-After"]
                assert client.get("/healthz").status_code == 200
            finally:
                db.unblock()

            again = client.get(first["url"], headers=svc.h(svc.alice))
            assert again.status_code == 200 and again.json()["certificate"] == first["certificate"]
            assert client.get("/readyz").status_code == 200
            done = wait_for(client.get, inflight["url"], svc.alice, timeout=120)
            assert done["status"] == "succeeded" and _certificates(app, inflight["id"]) == 1
            assert_same_certificate(done["certificate"], _reference(svc, png, done, 20, 3000))
            new = svc.submit(svc.alice, png, seed="45")
            assert new.status_code == 202, new.text
            assert wait_for(client.get, new.json()["url"], svc.alice)["status"] == "succeeded"


def test_no_free_database_connection_is_503_not_500(tmp_path: Path) -> None:
    """SQLAlchemy's pool timeout (every connection of the process in use for 30 s) is not a
    DBAPIError: it was answered 500 with a traceback in the log; it is the database being busy."""
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    app = create_app(service_settings(tmp_path / "data"))

    @app.get("/busy-pool")
    def busy() -> None:
        raise PoolTimeout("QueuePool limit of size 20 overflow 20 reached, connection timed out")

    with TestClient(app) as client:
        r = client.get("/busy-pool")
    assert r.status_code == 503 and r.json()["detail"] == "the database is busy; retry shortly"
    assert r.headers["Retry-After"] == "5"
