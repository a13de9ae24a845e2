"""What one request costs the database (docs/PERFORMANCE.md, "Enqueue and polling"): the
statements, commits and pings of POST /certify and GET /jobs/{id} on PostgreSQL; the pool's
ping of idle connections; and the batched ``enqueued_at`` marks (``domain.dispatch.SentMarks``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from service_support import (  # noqa: F401 - tiny_checkpoint and pg_url are fixtures
    digit_png,
    pg_url,
    reset_postgres,
    service_settings,
    tiny_checkpoint,
)
from sqlalchemy import event, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from test_service_embedded import Recorder, Service

from cli.asgi import create_app
from domain.dispatch import SentMarks
from domain.store import db as dbmod
from domain.store.migrate import upgrade
from domain.store.tables import ApiKey, Job


@pytest.fixture
def pg_service(tmp_path: Path, tiny_checkpoint: Path, pg_url: str) -> Iterator[Service]:  # noqa: F811
    reset_postgres(pg_url)
    upgrade(pg_url)
    settings = service_settings(tmp_path / "data", database_url=pg_url)
    app = create_app(settings, dispatcher=Recorder())
    with TestClient(app) as client:
        svc = Service(client, app, tiny_checkpoint)
        assert svc.register().status_code == 201
        yield svc


class Calls:
    """What an engine sends from request threads (the SentMarks thread writes on its own
    schedule and is left out): statements, pings, and the transaction commands psycopg sends
    itself (BEGIN, COMMIT, ROLLBACK: a rollback of a connection with no transaction open sends
    nothing and is not counted)."""

    def __init__(self, engine: Any, monkeypatch: pytest.MonkeyPatch):
        self.seen: Counter[str] = Counter()
        event.listen(engine, "before_cursor_execute", lambda *_a, **_k: self._count("statement"))
        ping = engine.dialect.do_ping

        def counted_ping(dbapi_conn: Any) -> bool:
            self._count("ping")
            return bool(ping(dbapi_conn))

        monkeypatch.setattr(engine.dialect, "do_ping", counted_ping)
        command = psycopg.Connection._exec_command

        def counted_command(conn: Any, sql: Any, *args: Any, **kwargs: Any) -> Any:
            text = sql.decode() if isinstance(sql, bytes) else str(sql)
            self._count(text.split()[0].upper())
            return command(conn, sql, *args, **kwargs)

        monkeypatch.setattr(psycopg.Connection, "_exec_command", counted_command)

    def _count(self, what: str) -> None:
        if threading.current_thread().name != "dmae-sent-marks":
            self.seen[what] += 1

    def during(self, request: Any) -> tuple[Any, dict[str, int]]:
        self.seen.clear()
        response = request()
        return response, dict(self.seen)


def test_a_submission_and_a_poll_cost_the_database_what_the_docs_say(
    pg_service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = pg_service
    calls = Calls(svc.app.state.db.engine, monkeypatch)
    # The first submission caches the key and a snapshot of the registry (DMAE_KEY_CACHE_S,
    # DMAE_REGISTRY_CACHE_S): a submission within those seconds reads neither.
    assert svc.submit(svc.alice, digit_png(2)).status_code == 202
    r, post = calls.during(lambda: svc.submit(svc.alice, digit_png(3), seed="11"))
    assert r.status_code == 202, r.text
    # BEGIN, INSERT job, INSERT input, lock the key row, count its active jobs, COMMIT; no ping
    # (the connection was in use a moment ago) and no UPDATE of enqueued_at (batched).
    assert post == {"BEGIN": 1, "statement": 4, "COMMIT": 1}, post
    r, get = calls.during(lambda: svc.client.get(r.json()["url"], headers=svc.h(svc.alice)))
    assert r.status_code == 200 and r.json()["status"] == "queued"
    assert get == {"statement": 1}, get  # one SELECT, in autocommit: no BEGIN, no ROLLBACK
    # The identical submission again: the unique key refuses the insert, the job is read back.
    r, again = calls.during(lambda: svc.submit(svc.alice, digit_png(3), seed="11"))
    assert r.status_code == 200 and "COMMIT" not in again, again


def _backend_pid(conn: Any) -> int:
    return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar())


def _terminate(url: str, pid: int) -> None:
    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    time.sleep(0.2)  # the backend is gone before the pool hands its connection out again


def test_pool_pings_only_idle_connections_and_replaces_dead_ones(
    pg_url: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = dbmod.make_engine(pg_url)
    calls = Calls(engine, monkeypatch)
    monkeypatch.setattr(dbmod, "IDLE_PING_S", 60.0)
    try:
        with engine.connect() as c:
            first = _backend_pid(c)
        with engine.connect() as c:  # in use a moment ago: handed out without a ping
            assert _backend_pid(c) == first
        assert calls.seen["ping"] == 0

        # Killed while idle, handed out after IDLE_PING_S: pinged, replaced, nobody sees it.
        _terminate(pg_url, first)
        monkeypatch.setattr(dbmod, "IDLE_PING_S", 0.05)
        with engine.connect() as c:
            second = _backend_pid(c)
        assert second != first and calls.seen["ping"] == 1

        # Killed while in steady use: the request in flight fails (the API answers 503), the
        # failure renews the pool, and the next request gets a live connection.
        monkeypatch.setattr(dbmod, "IDLE_PING_S", 60.0)
        _terminate(pg_url, second)
        with pytest.raises(DBAPIError) as failed, engine.connect() as c:
            c.exec_driver_sql("SELECT 1")
        assert failed.value.connection_invalidated
        with engine.connect() as c:
            assert _backend_pid(c) not in (first, second)
    finally:
        engine.dispose()


def _enqueued_at(svc: Service, job_id: str) -> Any:
    with svc.app.state.db.session() as s:
        return s.scalar(select(Job.enqueued_at).where(Job.id == job_id))


def test_sent_marks_are_written_within_moments_and_at_shutdown(
    tmp_path: Path,
    tiny_checkpoint: Path,  # noqa: F811
) -> None:
    app = create_app(service_settings(tmp_path / "data"), dispatcher=Recorder())
    with TestClient(app) as client:
        svc = Service(client, app, tiny_checkpoint)
        assert svc.register().status_code == 201
        first = svc.submit(svc.alice, digit_png(1)).json()["id"]
        deadline = time.monotonic() + 300
        while _enqueued_at(svc, first) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _enqueued_at(svc, first) is not None
        app.state.sent_marks.interval_s = 3600.0  # the thread's next flush is far away...
        time.sleep(0.1)
        second = svc.submit(svc.alice, digit_png(2)).json()["id"]
        assert _enqueued_at(svc, second) is None
    with app.state.db.session() as s:  # ...and the shutdown flushed it
        assert s.scalar(select(Job.enqueued_at).where(Job.id == second)) is not None


def test_sent_marks_survive_a_database_outage(tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    app = create_app(service_settings(tmp_path / "data"), dispatcher=Recorder())
    with TestClient(app) as client:
        svc = Service(client, app, tiny_checkpoint)
        assert svc.register().status_code == 201
        marks: SentMarks = app.state.sent_marks
        marks.close()  # flush by hand from here on
        job_id = svc.submit(svc.alice, digit_png(4)).json()["id"]
        working = marks.db
        marks.db = dbmod.Database("postgresql+psycopg://nobody@127.0.0.1:1/none")  # refused
        try:
            assert marks.flush() == 0  # not written, kept
        finally:
            marks.db.dispose()
            marks.db = working
        assert _enqueued_at(svc, job_id) is None
        assert marks.flush() == 1 and _enqueued_at(svc, job_id) is not None


def test_a_batch_of_sent_marks_is_one_statement_in_autocommit(
    pg_service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SentMarks writes 20 batches a second under load: one UPDATE each, no BEGIN or COMMIT
    (it was an ORM update in a transaction: 1.86 ms of CPU for 5 ids, now 0.51 ms)."""
    svc = pg_service
    marks: SentMarks = svc.app.state.sent_marks
    marks.close()  # flush by hand from here on
    ids = [svc.submit(svc.alice, digit_png(i)).json()["id"] for i in (5, 6, 7)]
    assert all(_enqueued_at(svc, i) is None for i in ids)
    calls = Calls(svc.app.state.db.engine, monkeypatch)
    written, sent = calls.during(marks.flush)
    assert written == 3 and sent == {"statement": 1}, sent
    assert all(_enqueued_at(svc, i) is not None for i in ids)


def test_a_nul_character_is_a_4xx_with_a_sentence_on_postgres(pg_service: Service) -> None:
    """PostgreSQL text cannot hold NUL: such ids and names were a 500 (psycopg's DataError)."""
    svc = pg_service
    user, admin = svc.h(svc.alice), svc.h(svc.admin)
    for method, path, headers in (
        ("GET", "/jobs/%00", user),
        ("DELETE", "/jobs/a%00b", user),
        ("GET", "/jobs/%00/input.png", user),
        ("GET", "/evaluations/%00", user),
        ("POST", "/admin/models/%00/activate", admin),
        ("GET", "/admin/training/%00", admin),
    ):
        r = svc.client.request(method, path, headers=headers)
        assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)
        assert isinstance(r.json()["detail"], str) and r.json()["detail"], r.text
    r = svc.register(name="tiny\x00evil")
    assert r.status_code == 422 and "model name" in r.json()["detail"], r.text


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


def test_the_admission_count_reads_only_the_keys_own_active_jobs(pg_service: Service) -> None:
    """Every submission counts its key's queued and running jobs. Through the partial index
    ``ix_jobs_owner_active`` (migration 0007) that reads those jobs and no others, however
    many jobs other keys have waiting and however long the key's history, also in a plan
    PostgreSQL caches for any parameters (a prepared statement's generic plan); before, it read
    every active job of every key through ``ix_jobs_status`` (3,005 rows here). The count stops
    at the cap + 1 a refusal needs, and any cap fits the bound LIMIT. (The planner chooses by
    cost: on a small table where the counting key holds most rows it may scan instead, which
    costs about 1 ms there; here, as in a real table, the key holds a small share.)"""
    from sqlalchemy import insert

    from domain.services import submissions

    svc = pg_service
    r = svc.submit(svc.alice, digit_png(1))
    assert r.status_code == 202, r.text
    engine = svc.app.state.db.engine
    with engine.begin() as c:
        row = dict(c.execute(select(Job.__table__).where(Job.id == r.json()["id"])).one()._mapping)
        alice = row["owner_id"]
        other = c.execute(select(ApiKey.id).where(ApiKey.id != alice).limit(1)).scalar_one()
        copies = []
        for owner, count, status in ((other, 3000, "queued"), (alice, 500, "succeeded"),
                                     (alice, 4, "queued")):  # fmt: skip
            for i in range(count):
                tag = f"{owner}-{status}-{i}"
                copies.append(row | {"id": tag, "owner_id": owner, "status": status,
                                     "request_key": tag})  # fmt: skip
        c.execute(insert(Job.__table__), copies)
        c.exec_driver_sql("ANALYZE jobs")
    count = submissions._ACTIVE
    sql = str(count.compile(dialect=engine.dialect))  # ... %(owner)s::INTEGER ... %(limit)s...
    prepared = sql.replace("%(owner)s", "$1").replace("%(limit)s", "$2")
    with engine.connect() as c:
        assert c.execute(count, {"owner": alice, "limit": 101}).scalar() == 5  # 1 + 4 queued
        assert c.execute(count, {"owner": alice, "limit": 3}).scalar() == 3
        c.exec_driver_sql(f"PREPARE active_count AS {prepared}")
        plans = []
        for mode in ("force_custom_plan", "force_generic_plan"):
            c.exec_driver_sql(f"SET plan_cache_mode = {mode}")
            explain = f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE active_count({alice}, 101)"
            plans.append(c.exec_driver_sql(explain).scalar()[0]["Plan"])
        c.rollback()
    for plan in plans:
        nodes = list(_plan_nodes(plan))
        assert any(n.get("Index Name") == "ix_jobs_owner_active" for n in nodes), plan
        rows_read = max(
            n.get("Actual Rows", 0) + n.get("Rows Removed by Filter", 0)
            + n.get("Rows Removed by Index Recheck", 0)
            for n in nodes
        )  # fmt: skip
        assert rows_read <= 5, plan
    # A cap beyond 32 bits (a LIMIT bound as INTEGER refused every submission with 422).
    huge = svc.app.state.settings.model_copy(update={"max_active_jobs": 10**20})
    with svc.app.state.db.session() as s:
        submissions.admit(s, alice, huge)
