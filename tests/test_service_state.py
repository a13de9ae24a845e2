"""Compare-and-set job state on SQLite and Postgres: one claim wins, stale attempts lose their
right to write, and a job can never hold two certificates."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from service_support import pg_url, reset_postgres  # noqa: F401 - pg_url is a fixture
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from domain.store import migrate, state
from domain.store.db import Database, utcnow
from domain.store.tables import ApiKey, Certificate, Checkpoint, Job, Status, new_id


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 's.sqlite3'}"
    else:
        url = request.getfixturevalue("pg_url")
        reset_postgres(url)
    migrate.upgrade(url)
    database = Database(url)
    yield database
    database.dispose()


def _job(db: Database) -> str:
    job_id = new_id()
    with db.session() as s:
        key = ApiKey(name="k", key_prefix="p", key_hash=new_id())
        ckpt = Checkpoint(name=new_id(), location="/x", file_sha256="0" * 64, format="project",
                          kind="classifier", input_size=8)  # fmt: skip
        s.add_all([key, ckpt])
        s.flush()
        s.add(Job(id=job_id, owner_id=key.id, request_key=new_id(), mode="certify",
                  checkpoint_id=ckpt.id, model_name=ckpt.name, sigma=0.25, alpha=0.001, n0=1,
                  n=1, seed=0, input_sha256="0" * 64))  # fmt: skip
        s.commit()
    return job_id


def _claim(db: Database, job_id: str, token: str, max_attempts: int = 3) -> state.Claim:
    with db.session() as s:
        return state.claim(s, Job, job_id, token, max_attempts=max_attempts, stale_after_s=60)


def test_exactly_one_concurrent_claim_wins(db: Database) -> None:
    job_id = _job(db)
    results: list[state.Claim] = []
    barrier = threading.Barrier(6)

    def go(i: int) -> None:
        barrier.wait()
        results.append(_claim(db, job_id, f"t{i}"))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count(state.Claim.CLAIMED) == 1
    assert results.count(state.Claim.NOT_CLAIMABLE) == 5


def test_a_stale_attempt_loses_the_job(db: Database) -> None:
    job_id = _job(db)
    assert _claim(db, job_id, "first") is state.Claim.CLAIMED
    with db.session() as s:  # its worker stops sending heartbeats
        s.execute(update(Job).where(Job.id == job_id)
                  .values(heartbeat_at=utcnow() - timedelta(minutes=5)))  # fmt: skip
        s.commit()
    assert _claim(db, job_id, "second") is state.Claim.CLAIMED
    with db.session() as s:
        assert not state.heartbeat(s, Job, job_id, "first", 10)
        assert not state.finish(s, Job, job_id, "first", Status.SUCCEEDED)
        assert state.finish(s, Job, job_id, "second", Status.SUCCEEDED)
        s.commit()
        job = s.get(Job, job_id)
        assert job is not None and job.attempts == 2 and job.status == "succeeded"
    assert _claim(db, job_id, "third") is state.Claim.NOT_CLAIMABLE


def test_attempts_cap_fails_the_job(db: Database) -> None:
    job_id = _job(db)
    assert _claim(db, job_id, "a", max_attempts=1) is state.Claim.CLAIMED
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id)
                  .values(heartbeat_at=utcnow() - timedelta(minutes=5)))  # fmt: skip
        s.commit()
    assert _claim(db, job_id, "b", max_attempts=1) is state.Claim.EXHAUSTED
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "failed" and "gave up after 1" in (job.error or "")


def test_one_certificate_per_job(db: Database) -> None:
    job_id = _job(db)
    with db.session() as s:
        s.add(Certificate(job_id=job_id, abstained=True, radius=0.0, body={}))
        s.commit()
        s.add(Certificate(job_id=job_id, abstained=False, radius=1.0, body={}))
        with pytest.raises(IntegrityError):
            s.commit()


class KindRecorder:
    """A dispatcher that records (task kind, id) and reports an empty broker queue."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def certify(self, job_id: str) -> None:
        self.sent.append(("certify", job_id))

    def train(self, run_id: str) -> None:
        self.sent.append(("train", run_id))

    def backlog(self) -> int | None:
        return 0


def test_sweep_requeues_each_kind_with_its_own_task(db: Database, tmp_path: Path) -> None:
    from domain.config import Settings
    from domain.store.tables import TrainingRun
    from worker.sweep import sweep_once

    settings = Settings(_env_file=None, data_dir=tmp_path, database_url=db.url)  # type: ignore[call-arg]
    job_id = _job(db)
    run_id = new_id()
    old = utcnow() - timedelta(hours=1)
    with db.session() as s:
        s.add(TrainingRun(id=run_id, kind="pretrain", dataset="digits:train", result_name="r"))
        s.commit()
        for table, rid in ((Job, job_id), (TrainingRun, run_id)):
            s.execute(update(table).where(table.id == rid).values(
                status="running", attempts=1, run_token="dead", heartbeat_at=old))  # fmt: skip
        s.commit()
    sent = KindRecorder()
    report = sweep_once(db, sent, settings)
    assert sorted(sent.sent) == [("certify", job_id), ("train", run_id)]
    assert sorted(report.requeued) == sorted([job_id, run_id]) and report.failed == []
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == "queued" and job.enqueued_at is not None
    # Sent again only once the broker's queue is empty and the resend delay has passed.
    assert sweep_once(db, sent, settings).resent == [] and len(sent.sent) == 2


def test_sent_marks_cover_queued_jobs_only_in_or_out_of_a_transaction(db: Database) -> None:
    """``mark_enqueued_many`` (one Core UPDATE per 500 ids): outside a transaction in
    autocommit, inside one after flushing what the session holds (a job added in the same
    transaction, not yet flushed, is marked too), and never a job that is not queued."""
    queued, running = _job(db), _job(db)
    with db.session() as s:
        s.execute(update(Job).where(Job.id == running).values(status=Status.RUNNING.value))
        s.commit()
    with db.session() as s:
        state.mark_enqueued_many(s, [queued, running, "no-such-job"], chunk=2)
    with db.session() as s:
        marked = {j.id: j.enqueued_at for j in s.query(Job)}
    assert marked[queued] is not None and marked[running] is None
    with db.session() as s:
        template = s.get(Job, queued)
        assert template is not None
        added = new_id()
        s.add(Job(id=added, owner_id=template.owner_id, request_key=new_id(), mode="certify",
                  checkpoint_id=template.checkpoint_id, model_name="m", sigma=0.25,
                  alpha=0.001, n0=1, n=1, seed=0, input_sha256="0" * 64))  # fmt: skip
        assert s.in_transaction()
        state.mark_enqueued_many(s, [added])
    with db.session() as s:
        job = s.get(Job, added)
        assert job is not None and job.enqueued_at is not None
