"""Abuse controls: per-key admission control, per-key rate limits (in memory and shared through
Redis across API processes), Idempotency-Key, and no re-roll on re-submission."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_support import (  # noqa: F401 - tiny_checkpoint and pg_url are fixtures
    REDIS_URL,
    database,
    digit_png,
    pg_url,
    redis_keys_cleaned,
    service_settings,
    tiny_checkpoint,
    wait_for,
)
from sqlalchemy import func, select
from test_service_embedded import Recorder, Service

from cli.asgi import create_app
from domain.store.tables import IdempotencyKey, Job


def _service(app: Any, client: TestClient, checkpoint: Path) -> Service:
    svc = Service(client, app, checkpoint)
    assert svc.register().status_code == 201
    return svc


@pytest.fixture
def held(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Service]:  # noqa: F811
    """A service whose jobs stay queued (the dispatcher only records them), 2 active jobs/key."""
    app = create_app(service_settings(tmp_path / "data", max_active_jobs=2), dispatcher=Recorder())
    with TestClient(app) as client:
        yield _service(app, client, tiny_checkpoint)


def _jobs(svc: Service) -> int:
    with svc.app.state.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(Job)) or 0)


def test_admission_control_caps_active_jobs_per_key(held: Service) -> None:
    png = digit_png(0)
    first = held.submit(held.alice, png, seed="1")
    assert held.submit(held.alice, png, seed="2").status_code == 202 and first.status_code == 202
    r = held.submit(held.alice, png, seed="3")
    assert r.status_code == 429, r.text
    assert "too many jobs in progress" in r.json()["detail"] and "at most 2" in r.json()["detail"]
    assert int(r.headers["Retry-After"]) > 0
    assert _jobs(held) == 2  # the refused submission stored nothing
    # The identical request adds no work: it is answered with the stored job, cap or not.
    again = held.submit(held.alice, png, seed="1")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    # Another client has its own allowance.
    assert held.submit(held.bob, png, seed="3").status_code == 202
    # A finished (here: cancelled) job frees a place.
    assert held.client.delete(first.json()["url"], headers=held.h(held.alice)).status_code == 200
    assert held.submit(held.alice, png, seed="3").status_code == 202
    # Re-queuing the cancelled job would make three active: refused too.
    r = held.submit(held.alice, png, seed="1")
    assert r.status_code == 429 and "Retry-After" in r.headers


def test_rate_limit_in_memory(tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    settings = service_settings(tmp_path / "data", rate_limit_requests=4, rate_limit_window_s=60)
    app = create_app(settings, dispatcher=Recorder())
    with TestClient(app) as client:
        svc = _service(app, client, tiny_checkpoint)
        codes = [client.get("/jobs", headers=svc.h(svc.alice)).status_code for _ in range(4)]
        assert codes == [200] * 4
        r = client.get("/jobs", headers=svc.h(svc.alice))
        assert r.status_code == 429 and "at most 4 requests per 60 s" in r.json()["detail"]
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        r = svc.submit(svc.alice, digit_png(0))
        assert r.status_code == 429 and _jobs(svc) == 0  # refused before anything is stored
        assert client.get("/jobs", headers=svc.h(svc.bob)).status_code == 200  # per key
        assert client.get("/healthz").status_code == 200  # probes are not limited


def test_rate_limit_holds_across_api_processes(
    tmp_path: Path,
    tiny_checkpoint: Path,  # noqa: F811
    redis_keys_cleaned: None,  # noqa: F811 - its counters are deleted afterwards
) -> None:
    """Two API instances (own limiter objects, own memory) sharing Redis share one limit."""
    settings = service_settings(
        tmp_path / "data",
        rate_limit_requests=6,
        rate_limit_window_s=60,
        rate_limit_url=REDIS_URL,
        queue=f"dmae-test-{uuid.uuid4().hex[:10]}",  # the counters' namespace
    )
    one = create_app(settings, dispatcher=Recorder())
    two = create_app(settings, dispatcher=Recorder())
    with TestClient(one) as c1, TestClient(two) as c2:
        svc = _service(one, c1, tiny_checkpoint)
        codes = [
            (c1 if i % 2 else c2).get("/jobs", headers=svc.h(svc.alice)).status_code
            for i in range(8)
        ]
        assert codes == [200] * 6 + [429] * 2, codes

    # Redis unreachable: the limit still applies, counted in the process's memory.
    down = service_settings(
        tmp_path / "data",
        rate_limit_requests=3,
        rate_limit_url="redis://127.0.0.1:1/0",
    )
    app = create_app(down, dispatcher=Recorder())
    with TestClient(app) as client:
        codes = [client.get("/jobs", headers=svc.h(svc.bob)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]


def test_idempotency_key(held: Service) -> None:
    png = digit_png(1)
    key = {"Idempotency-Key": str(uuid.uuid4())}

    def post(api_key: str, headers: dict[str, Any], **form: str) -> Any:
        return held.client.post(
            "/certify",
            headers={**held.h(api_key), **headers},
            files={"image": ("d.png", png)},
            data={"sigma": "0.25", "n0": "20", "n": "200", **form},
        )

    first = post(held.alice, key, seed="5")
    assert first.status_code == 202, first.text
    again = post(held.alice, key, seed="5")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    other = post(held.alice, key, seed="6")  # same key, another payload
    assert other.status_code == 422 and "different request" in other.json()["detail"]
    assert post(held.alice, key, seed="5", n="201").status_code == 422
    # Keys are per client: bob's identical key is his own.
    theirs = post(held.bob, key, seed="5")
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]
    # A request that fails makes no job and frees its key: the corrected retry proceeds.
    fresh = {"Idempotency-Key": "retry-" + uuid.uuid4().hex}
    bad = post(held.alice, fresh, seed="7", alpha="0.9")
    assert bad.status_code == 422 and "alpha" in bad.json()["detail"]
    good = post(held.alice, fresh, seed="7")
    assert good.status_code == 202
    # Over the admission cap (2 active for alice now): refused, key freed, nothing stored.
    capped = {"Idempotency-Key": "capped-" + uuid.uuid4().hex}
    assert post(held.alice, capped, seed="8").status_code == 429
    with held.app.state.db.session() as s:
        held_key = select(IdempotencyKey).where(IdempotencyKey.key == capped["Idempotency-Key"])
        assert s.scalar(held_key) is None
    for bad_key in ("", "x" * 256, "caf\u00e9".encode(), "a b"):
        r = post(held.alice, {"Idempotency-Key": bad_key}, seed="9")
        assert r.status_code == 422, (bad_key, r.text)
        assert "Idempotency-Key must be" in r.json()["detail"]


class Blocking(Recorder):
    """A dispatcher that holds the submitting request inside the endpoint until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def certify(self, job_id: str) -> None:
        self.entered.set()
        assert self.release.wait(30)
        super().certify(job_id)


def test_a_header_given_twice_is_422(held: Service) -> None:
    """Two Idempotency-Key headers (or API keys): which one would count is not the client's to
    guess (one was used without a word); nothing is stored."""
    before = _jobs(held)
    twice = [("X-API-Key", held.alice), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
    r = held.client.post(
        "/certify", headers=twice, files={"image": ("d.png", digit_png(4))},
        data={"sigma": "0.25", "n0": "20", "n": "200"},
    )  # fmt: skip
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == "header 'idempotency-key' given more than once: give it once"
    assert _jobs(held) == before
    keys = [("X-API-Key", held.alice), ("X-API-Key", held.bob)]
    r = held.client.get("/jobs", headers=keys)
    assert r.status_code == 422 and "'x-api-key' given more than once" in r.json()["detail"]
    assert held.client.get("/jobs", headers=held.h(held.alice)).status_code == 200


def test_idempotency_key_in_flight_is_409(tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    dispatcher = Blocking()
    app = create_app(service_settings(tmp_path / "data"), dispatcher=dispatcher)
    with TestClient(app) as client:
        svc = _service(app, client, tiny_checkpoint)
        headers = {**svc.h(svc.alice), "Idempotency-Key": "in-flight-1"}
        form = {"sigma": "0.25", "n0": "20", "n": "200"}
        files = {"image": ("d.png", digit_png(2))}
        answers: list[Any] = []
        first = threading.Thread(
            target=lambda: answers.append(
                client.post("/certify", headers=headers, files=files, data=form)
            )
        )
        first.start()
        try:
            assert dispatcher.entered.wait(30)
            r = client.post("/certify", headers=headers, files=files, data=form)
            assert r.status_code == 409, r.text
            assert "still being processed" in r.json()["detail"] and r.headers["Retry-After"]
        finally:
            dispatcher.release.set()
            first.join(30)
        assert answers and answers[0].status_code == 202
        r = client.post("/certify", headers=headers, files=files, data=form)
        assert r.status_code == 200 and r.json()["id"] == answers[0].json()["id"]
        assert dispatcher.sent == [answers[0].json()["id"]]  # sent once


def test_resubmission_returns_the_stored_certificate(
    tmp_path: Path,
    tiny_checkpoint: Path,  # noqa: F811
) -> None:
    """No re-roll: the same image, model and parameters give back the stored certificate, with
    or without an explicit seed, and no second job or noise draw."""
    app = create_app(service_settings(tmp_path / "data"))
    with TestClient(app) as client:
        svc = _service(app, client, tiny_checkpoint)
        png = digit_png(3)
        job = wait_for(client.get, svc.submit(svc.alice, png).json()["url"], svc.alice)
        assert job["status"] == "succeeded"
        for form in ({}, {"seed": str(job["seed"])}, {"model": "tiny-s0.25"}):
            r = svc.submit(svc.alice, png, **form)
            assert r.status_code == 200 and r.json()["id"] == job["id"], form
            assert r.json()["certificate"] == job["certificate"]
        assert svc.certificates() == 1 and _jobs(svc) == 1


def _race(url: str, tmp_path: Path, checkpoint: Path, admit: Any, cap: int, racers: int) -> int:
    """``racers`` threads submit distinct images for one key at once; returns the jobs stored.

    On Postgres every racer is held at a barrier after writing its job and before the admission
    count, so all counts overlap. (SQLite's write lock, taken by the insert, already makes the
    writers wait for each other: a barrier there would only deadlock.)"""
    import shutil

    from domain import registry
    from domain.keys import Caller, create_key
    from domain.services import submissions
    from domain.store.db import get_database

    settings = service_settings(tmp_path / "data", database_url=url, max_active_jobs=cap)
    db = get_database(url)
    shutil.copy(checkpoint, tmp_path / "tiny.safetensors")
    with db.session() as s:
        registry.register(
            s, location=str(tmp_path / "tiny.safetensors"), name="tiny-s0.25", default=True
        )
        key, _ = create_key(s, "racer")
        s.commit()
        caller = Caller(key.id, False)
    barrier = threading.Barrier(racers, timeout=300)
    codes: list[int] = []

    def held_admit(session: Any, owner_id: int, settings: Any) -> None:
        if not settings.is_sqlite:
            barrier.wait()  # every racer has flushed its job: all count "at once"
        admit(session, owner_id, settings)

    def racer(i: int) -> None:
        params = submissions.Params(sigma=0.25, n0=20, n=200, seed=1000 + i)
        with db.session() as s:
            try:
                submissions.submit(s, caller, digit_png(i % 50), params, settings)
                codes.append(202)
            except submissions.ServiceError as exc:
                codes.append(exc.status_code)

    original = submissions.admit
    submissions.admit = held_admit
    try:
        threads = [threading.Thread(target=racer, args=(i,)) for i in range(racers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        submissions.admit = original
    with db.session() as s:
        stored = int(s.scalar(select(func.count()).select_from(Job)) or 0)
    db.dispose()
    assert len(codes) == racers and set(codes) <= {202, 429}, codes
    assert codes.count(202) == stored
    return stored


def test_admission_cap_holds_under_concurrent_submissions(
    database: str,
    tmp_path: Path,
    tiny_checkpoint: Path,  # noqa: F811
) -> None:
    """12 submissions of one key race; the cap of 3 admits exactly 3, on SQLite and Postgres."""
    from domain.services import submissions
    from domain.store import migrate

    migrate.upgrade(database)
    assert _race(database, tmp_path, tiny_checkpoint, submissions.admit, cap=3, racers=12) == 3


def test_the_race_test_catches_an_unlocked_count(
    pg_url: str,  # noqa: F811
    tmp_path: Path,
    tiny_checkpoint: Path,  # noqa: F811
) -> None:
    """Teeth: the same count without the key-row lock lets every racer in (overshoot)."""
    from service_support import reset_postgres

    from domain.services.submissions import ServiceError
    from domain.store import migrate
    from domain.store.tables import ACTIVE_STATUSES

    reset_postgres(pg_url)
    migrate.upgrade(pg_url)

    def unlocked_admit(session: Any, owner_id: int, settings: Any) -> None:
        active = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.owner_id == owner_id, Job.status.in_(ACTIVE_STATUSES))
        )
        if active > settings.max_active_jobs:
            session.rollback()
            raise ServiceError(429, "over the cap")

    assert _race(pg_url, tmp_path, tiny_checkpoint, unlocked_admit, cap=3, racers=12) > 3
