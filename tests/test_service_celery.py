"""The production path for real: Postgres + Redis + a `dmae-certify worker` (Celery) process.

The API runs in-process (TestClient) and sends job ids to Redis; a real Celery worker
subprocess, started here with the test's settings, claims and runs them against Postgres.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from fault_support import free_port, terminate
from service_support import (  # noqa: F401 - pg_url is a fixture
    REDIS_URL,
    SIGMA,
    assert_same_certificate,
    digit_png,
    make_checkpoint,
    pg_url,
    redis_keys_cleaned_module,
    reference,
    reset_postgres,
    service_settings,
    wait_for,
)
from sqlalchemy import func, select, update
from test_service_embedded import Recorder, Service

from cli.asgi import create_app
from domain.store import migrate
from domain.store.db import utcnow
from domain.store.tables import Certificate, Job

WORKER_ENV = {
    "DMAE_DEVICE": "cpu",
    "DMAE_BATCH_SIZE": "64",
    "DMAE_REGISTER_BUNDLED": "false",
    "DMAE_HEARTBEAT_S": "0.2",
    "DMAE_SWEEP_INTERVAL_S": "0.5",
    "DMAE_STALE_AFTER_S": "3",
    "DMAE_MAX_ATTEMPTS": "2",
    "DMAE_REQUEUE_AFTER_S": "2",
}


@pytest.fixture(scope="module")
def stack(
    pg_url: str,  # noqa: F811
    redis_keys_cleaned_module: None,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    """A migrated Postgres database, a Redis queue and a running Celery worker process."""
    import uuid

    reset_postgres(pg_url)
    migrate.upgrade(pg_url)
    data = tmp_path_factory.mktemp("celery") / "data"
    checkpoint = make_checkpoint(data / "checkpoints" / "tiny.safetensors")
    queue = f"dmae-test-{uuid.uuid4().hex[:10]}"
    env = {
        **os.environ,
        **WORKER_ENV,
        "DMAE_DATABASE_URL": pg_url,
        "DMAE_BROKER_URL": REDIS_URL,
        "DMAE_QUEUE": queue,
        "DMAE_DATA_DIR": str(data),
        "DMAE_LOG_FORMAT": "json",
    }
    metrics_port = free_port()
    log = open(data.parent / "worker.log", "wb")  # noqa: SIM115 - closed below
    cli = str(Path(sys.executable).parent / "dmae-certify")
    proc = subprocess.Popen(
        [
            cli,
            "worker",
            "--pool",
            "solo",
            "--log-level",
            "info",
            "--metrics-port",
            str(metrics_port),
        ],
        env=env,
        cwd=data.parent,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield {
            "pg": pg_url,
            "queue": queue,
            "data": data,
            "checkpoint": checkpoint,
            "proc": proc,
            "log": data.parent / "worker.log",
            "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
        }
    finally:
        terminate(proc)
        log.close()  # redis_keys_cleaned_module then deletes the queue's and kombu's keys


@pytest.fixture
def service(stack: dict[str, Any]) -> Iterator[Service]:
    settings = service_settings(
        stack["data"],
        database_url=stack["pg"],
        broker_url=REDIS_URL,
        queue=stack["queue"],
        max_attempts=2,
    )
    app = create_app(settings)
    with TestClient(app) as client:
        svc = Service(client, app, stack["checkpoint"])
        r = svc.register()
        assert r.status_code in (201, 409), r.text
        yield svc


def _worker_alive(stack: dict[str, Any]) -> None:
    if stack["proc"].poll() is not None:
        raise AssertionError("worker died:\n" + Path(stack["log"]).read_text()[-3000:])


def test_worker_certificate_is_the_cores(service: Service, stack: dict[str, Any]) -> None:
    png = digit_png(0)
    r = service.submit(service.alice, png)
    assert r.status_code == 202, r.text
    _worker_alive(stack)
    job = wait_for(service.client.get, r.json()["url"], service.alice, timeout=120)
    assert job["status"] == "succeeded", (job, Path(stack["log"]).read_text()[-3000:])
    want = reference(
        stack["checkpoint"],
        png,
        sigma=SIGMA,
        alpha=0.001,
        n0=20,
        n=200,
        seed=job["seed"],
        batch_size=64,
    )
    assert_same_certificate(job["certificate"], want)
    again = service.submit(service.alice, png)
    assert again.status_code == 200 and again.json()["certificate"] == job["certificate"]
    # The CLI, given the same image, model, parameters and seed, prints the same result.
    image = stack["data"].parent / "digit0.png"
    image.write_bytes(png)
    tsv = stack["data"].parent / "cli.tsv"
    cli = str(Path(sys.executable).parent / "dmae-certify")
    out = subprocess.run(
        [cli, "certify", "--input", str(image), "--checkpoint", str(stack["checkpoint"]),
         "--n0", "20", "--n", "200", "--seed", str(job["seed"]), "--batch", "64",
         "--device", "cpu", "--no-progress", "--out", str(tsv)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    header, line = tsv.read_text().splitlines()[:2]
    row = dict(zip(header.split("\t"), line.split("\t"), strict=True))
    cert = job["certificate"]
    assert int(row["predict"]) == (-1 if cert["prediction"] is None else cert["prediction"])
    assert int(row["count_a"]) == cert["count_a"]
    assert float(row["radius"]) == cert["radius"] and float(row["pa_lower"]) == cert["pa_lower"]
    assert row["tensor_sha256"] == cert["tensor_sha256"]  # the CLI certified the same tensor


def test_redelivered_task_never_writes_a_second_certificate(
    service: Service, stack: dict[str, Any]
) -> None:
    png = digit_png(1)
    job = wait_for(
        service.client.get,
        service.submit(service.alice, png).json()["url"],
        service.alice,
        timeout=120,
    )
    assert job["status"] == "succeeded"
    dispatcher = service.app.state.dispatcher
    for _ in range(3):  # the same task id delivered again, as after a lost acknowledgement
        dispatcher.certify(job["id"])
    probe = wait_for(
        service.client.get,
        service.submit(service.alice, png, seed="99").json()["url"],
        service.alice,
        timeout=120,
    )  # the worker has consumed the queue up to here
    assert probe["status"] == "succeeded"
    with service.app.state.db.session() as s:
        n = s.scalar(
            select(func.count()).select_from(Certificate).where(Certificate.job_id == job["id"])
        )
    assert n == 1
    after = service.client.get(job["url"], headers=service.h(service.alice)).json()
    assert after["certificate"] == job["certificate"] and after["attempts"] == 1


def test_cancel_on_the_worker(service: Service, stack: dict[str, Any]) -> None:
    png = digit_png(2)
    big = {"n": "100000", "n0": "10"}
    running = service.submit(service.alice, png, **big).json()
    wait_for(service.client.get, running["url"], service.alice, until=("running",), timeout=120)
    queued = service.submit(service.alice, png, seed="5", **big).json()
    for job in (queued, running):
        r = service.client.delete(job["url"], headers=service.h(service.alice))
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
    nxt = service.submit(service.alice, png, seed="6").json()
    assert (
        wait_for(service.client.get, nxt["url"], service.alice, timeout=120)["status"]
        == "succeeded"
    )
    for job in (queued, running):
        final = service.client.get(job["url"], headers=service.h(service.alice)).json()
        assert final["status"] == "cancelled" and final["certificate"] is None
    assert (
        service.client.get(queued["url"], headers=service.h(service.alice)).json()["attempts"] == 0
    )


def test_sweep_requeues_lost_jobs_and_fails_them_past_the_cap(
    service: Service, stack: dict[str, Any]
) -> None:
    """A job left 'running' by a vanished worker is re-run by the worker's sweep; one that has
    already used its attempts is failed with the reason."""
    png = digit_png(3)
    lost = service.submit(service.alice, png, seed="11").json()
    spent = service.submit(service.alice, png, seed="12").json()
    wait_for(service.client.get, lost["url"], service.alice, timeout=120)
    wait_for(service.client.get, spent["url"], service.alice, timeout=120)
    old = utcnow() - timedelta(minutes=5)
    with service.app.state.db.session() as s:  # as if their workers died mid-run
        s.execute(
            Certificate.__table__.delete().where(Certificate.job_id.in_([lost["id"], spent["id"]]))
        )
        for job_id, attempts in ((lost["id"], 1), (spent["id"], 2)):
            s.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    status="running",
                    attempts=attempts,
                    run_token="dead",
                    heartbeat_at=old,
                    finished_at=None,
                )
            )
        s.commit()
    redone = wait_for(service.client.get, lost["url"], service.alice, timeout=300)
    assert redone["status"] == "succeeded" and redone["attempts"] == 2
    failed = wait_for(service.client.get, spent["url"], service.alice, timeout=300)
    assert failed["status"] == "failed" and "gave up after 2 attempts" in failed["error"]
    assert failed["certificate"] is None


def test_sweep_resends_jobs_whose_message_was_lost(stack: dict[str, Any]) -> None:
    """A queued job whose message vanished from the broker (e.g. Redis restarted without
    persistence) is sent again by the worker's sweep and completes."""
    settings = service_settings(
        stack["data"], database_url=stack["pg"], broker_url=REDIS_URL, queue=stack["queue"]
    )
    lost = Recorder()
    app = create_app(settings, dispatcher=lost)
    with TestClient(app) as client:
        svc = Service(client, app, stack["checkpoint"])
        job = svc.submit(svc.alice, digit_png(4), seed="21").json()
        assert lost.sent == [job["id"]] and job["status"] == "queued"
        done = wait_for(client.get, job["url"], svc.alice, timeout=300)
        assert done["status"] == "succeeded" and done["attempts"] == 1


def test_worker_metrics_and_json_job_log(service: Service, stack: dict[str, Any]) -> None:
    """The Celery path: the worker's own /metrics counts the job and its noisy samples, and its
    JSON log has one line per state change with the job id, model and mode."""
    import httpx
    from test_metrics import samples, total

    r = service.submit(service.alice, digit_png(7))
    assert r.status_code == 202, r.text
    job = wait_for(service.client.get, r.json()["url"], service.alice, timeout=120)
    assert job["status"] == "succeeded", job
    api = samples(service.client.get("/metrics").text)
    assert total(api, "dmae_jobs_total", mode="certify", status="queued") >= 1
    worker = samples(httpx.get(stack["metrics"], timeout=10).text)
    assert total(worker, "dmae_jobs_total", mode="certify", status="succeeded") >= 1
    assert total(worker, "dmae_samples_total", model="tiny-s0.25", device="cpu") >= 220
    lines = [
        json.loads(x) for x in Path(stack["log"]).read_text().splitlines() if x.startswith("{")
    ]
    mine = [x for x in lines if x.get("job_id") == job["id"]]
    assert [x["status"] for x in mine] == ["running", "succeeded"], mine
    assert all(x["model"] == "tiny-s0.25" and x["mode"] == "certify" for x in mine)
    assert mine[-1]["run_s"] > 0 and mine[0]["queue_wait_s"] >= 0


def test_worker_signs_and_replays(service: Service, stack: dict[str, Any]) -> None:
    """The Celery worker signs with the key the API publishes (the shared data folder) and runs
    a replay as a job of its own: identical counts, still one certificate."""
    from domain.trust import signing
    from domain.trust.verification import verify_certificate

    png = digit_png(8)
    job = wait_for(service.client.get, service.submit(service.alice, png).json()["url"],
                   service.alice, timeout=120)  # fmt: skip
    assert job["status"] == "succeeded", job
    keys = signing.load_public_keys(service.client.get("/keys").text)
    verdict = verify_certificate(job["certificate"], public_keys=keys, image_bytes=png)
    assert verdict.valid, verdict.reason
    r = service.client.post(f"/jobs/{job['id']}/replay", headers=service.h(service.admin))
    assert r.status_code == 202, r.text
    replay = wait_for(service.client.get, r.json()["url"], service.admin, timeout=120)
    assert replay["status"] == "succeeded", (replay, Path(stack["log"]).read_text()[-3000:])
    assert replay["replay"]["identical"] and replay["certificate"] is None
    with service.app.state.db.session() as s:
        n = s.scalar(
            select(func.count()).select_from(Certificate).where(Certificate.job_id == job["id"])
        )
    assert n == 1


def test_worker_runs_a_decide_job(service: Service, stack: dict[str, Any]) -> None:
    """mode=decide through Postgres, Redis and the Celery worker: a decision with the samples it
    used, equal to the core's for the job's seed."""
    from models.checkpoints import load_classifier_with_meta
    from models.images import preprocess_image
    from models.smoothing import BatchSampler, decide

    png = digit_png(9)
    r = service.submit(service.alice, png, mode="decide", target_radius="0.1", n="2000")
    assert r.status_code == 202, r.text
    job = wait_for(service.client.get, r.json()["url"], service.alice, timeout=120)
    assert job["status"] == "succeeded", (job, Path(stack["log"]).read_text()[-3000:])
    cert = job["certificate"]
    model, meta = load_classifier_with_meta(stack["checkpoint"])
    import io

    from PIL import Image

    x = preprocess_image(Image.open(io.BytesIO(png)), meta.input_size).tensor
    want = decide(BatchSampler(model, 10, 64), x, SIGMA, 0.1, 20, 2000, 0.001, job["seed"])
    assert (cert["decision"], cert["n_used"], cert["counts"]) == (
        want.decision,
        want.n_used,
        want.counts,
    )


def test_worker_runs_an_evaluation(service: Service, stack: dict[str, Any]) -> None:
    """The digits:test evaluation (skip 12: 30 images, n = 1,000, bundled digits-s0.25) through
    Postgres, Redis and the Celery worker: every image certified, accuracy at r = 0 >= 0.9,
    the 30-row TSV and the PNG."""
    import io

    from PIL import Image

    from domain import registry
    from models.evaluate import Row

    with service.app.state.db.session() as s:
        registry.register_bundled(s)  # the worker loads bundled models from its own install
    r = service.client.post(
        "/evaluations",
        headers=service.h(service.alice),
        data={"dataset": "digits:test", "model": "digits-s0.25", "n": "1000", "skip": "12"},
    )
    assert r.status_code == 202, r.text
    _worker_alive(stack)
    ev = wait_for(service.client.get, r.json()["url"], service.alice, timeout=240)
    assert ev["status"] == "succeeded", (ev, Path(stack["log"]).read_text()[-3000:])
    assert ev["progress"]["images_done"] == 30 and ev["certified_accuracy"][0]["accuracy"] >= 0.9
    tsv = service.client.get(ev["results_url"], headers=service.h(service.alice)).text
    rows = [Row.parse(line) for line in tsv.splitlines()[1:]]
    assert [row.idx for row in rows] == list(range(0, 360, 12))
    png = service.client.get(ev["plot_url"], headers=service.h(service.alice))
    assert Image.open(io.BytesIO(png.content)).format == "PNG"


def test_the_published_message_is_celerys_own(tmp_path: Path) -> None:
    """The dispatcher builds Celery's task message itself (without ``send_task``'s per-call
    routing, and with the arguments' display form given): what lands on the queue has exactly
    the headers and body of Celery's own message for the task."""
    import base64
    import uuid

    import redis

    from worker.celery_app import CERTIFY_TASK, CeleryDispatcher

    queue = f"dmae-message-{uuid.uuid4().hex[:8]}"
    settings = service_settings(tmp_path / "data", broker_url=REDIS_URL, queue=queue)
    dispatcher = CeleryDispatcher(settings)
    job_id = str(uuid.uuid4())
    client = redis.Redis.from_url(REDIS_URL)
    try:
        dispatcher.certify(job_id)
        raw = client.rpop(queue)
        assert client.llen(queue) == 0
    finally:
        client.delete(queue)
    assert isinstance(raw, bytes)
    sent = json.loads(raw)
    own = dispatcher.app.amqp.create_task_message(job_id, CERTIFY_TASK, [job_id], {})
    assert sent["headers"] == json.loads(json.dumps(own.headers))
    assert sent["headers"]["argsrepr"] == f"['{job_id}']" and sent["headers"]["kwargsrepr"] == "{}"
    body = json.loads(base64.b64decode(sent["body"]))
    assert body == json.loads(json.dumps(own.body))
