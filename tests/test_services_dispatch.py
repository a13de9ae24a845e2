"""The use cases of ``domain.services.dispatching`` called directly, without HTTP, on a real
database (SQLite and PostgreSQL): a submission stored and handed to a recording dispatcher, a
broker that is down (the job stays stored and the error names it), ``Idempotency-Key`` replays,
an evaluation's jobs sent in turn, and a training run launched."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from service_support import (  # noqa: F401 - database, pg_url and tiny_checkpoint are fixtures
    database,
    digit_png,
    pg_url,
    service_settings,
    tiny_checkpoint,
)
from sqlalchemy import select

from domain import registry
from domain.config import Settings
from domain.dispatch import Dispatcher, SentMarks
from domain.errors import BrokerUnavailable, ServiceError
from domain.keys import Caller, create_key
from domain.services import dispatching, evaluations
from domain.services.dispatching import Outcome, Submission, Training
from domain.services.submissions import Params
from domain.store import migrate
from domain.store.db import Database, get_database
from domain.store.tables import Evaluation, IdempotencyKey, Job, Status, TrainingRun


class Recording:
    """A dispatcher that records what it was given; ``down_after`` sends succeed, then the
    broker is down (None: never)."""

    def __init__(self, down_after: int | None = None) -> None:
        self.sent: list[str] = []
        self.trained: list[str] = []
        self.down_after = down_after

    def certify(self, job_id: str) -> None:
        if self.down_after is not None and len(self.sent) >= self.down_after:
            raise BrokerUnavailable("the job queue is unavailable; retry later")
        self.sent.append(job_id)

    def train(self, run_id: str) -> None:
        self.trained.append(run_id)

    def backlog(self) -> int | None:
        return None


@dataclass
class World:
    db: Database
    settings: Settings
    client: Caller
    admin: Caller
    marks: SentMarks


@pytest.fixture
def world(database: str, tmp_path: Path, tiny_checkpoint: Path) -> Iterator[World]:  # noqa: F811
    migrate.upgrade(database)
    settings = service_settings(tmp_path / "data", database_url=database)
    db = get_database(database)
    shutil.copy(tiny_checkpoint, tmp_path / "tiny.safetensors")
    with db.session() as s:
        registry.register(
            s, location=str(tmp_path / "tiny.safetensors"), name="tiny-s0.25", default=True
        )
        client, _ = create_key(s, "client")
        admin, _ = create_key(s, "admin", admin=True)
        s.commit()
        ids = client.id, admin.id
    marks = SentMarks(db, interval_s=3600)  # flushed by the tests themselves
    try:
        yield World(db, settings, Caller(ids[0], False), Caller(ids[1], True), marks)
    finally:
        marks.close()


PARAMS = Params(sigma=0.25, n0=20, n=200)


def _certify(
    w: World, dispatcher: Dispatcher, key: str | None = None, n: int = PARAMS.n
) -> Submission:
    """POST /certify's use case for digit 0 with ``PARAMS`` (``n`` changed: another request)."""
    params = dataclasses.replace(PARAMS, n=n)
    with w.db.session() as s:
        return dispatching.certify(
            s, w.client, digit_png(0), params, w.settings, dispatcher, w.marks, key
        )


def test_a_submission_is_stored_sent_and_marked_once(world: World) -> None:
    recording = Recording()
    first = _certify(world, recording)
    assert first.outcome is Outcome.QUEUED and first.certificate is None and first.upload is None
    assert recording.sent == [first.job.id]
    assert world.marks.flush() == 1
    with world.db.session() as s:
        job = s.get(Job, first.job.id)
        assert job is not None and job.status == Status.QUEUED.value
        assert job.enqueued_at is not None and job.owner_id == world.client.id
    again = _certify(world, recording)  # the identical request: its job, no new noise
    assert again.outcome is Outcome.FOUND and again.job.id == first.job.id
    assert recording.sent == [first.job.id]


def test_a_broker_down_leaves_the_job_stored_and_names_it(world: World) -> None:
    with pytest.raises(BrokerUnavailable) as raised:
        _certify(world, Recording(down_after=0))
    error = raised.value
    assert error.status_code == 503 and error.headers == {"Retry-After": "30"}
    assert error.job_id is not None
    with world.db.session() as s:
        job = s.get(Job, error.job_id)
        assert job is not None and job.status == Status.QUEUED.value
        assert job.enqueued_at is None  # the sweep sends it once the broker is back
    assert world.marks.flush() == 0


def test_an_idempotency_key_replays_the_first_job(world: World) -> None:
    recording = Recording()
    first = _certify(world, recording, key="retry-1")
    replayed = _certify(world, recording, key="retry-1")
    assert replayed.outcome is Outcome.REPLAYED and replayed.job.id == first.job.id
    assert recording.sent == [first.job.id]
    with pytest.raises(ServiceError) as other:  # the key with another request
        _certify(world, recording, key="retry-1", n=300)
    assert other.value.status_code == 422


def test_a_key_names_the_job_a_broker_down_stored_and_frees_on_failure(world: World) -> None:
    with pytest.raises(BrokerUnavailable) as raised:
        _certify(world, Recording(down_after=0), key="down-1", n=250)
    back = _certify(world, Recording(), key="down-1", n=250)
    assert back.outcome is Outcome.REPLAYED and back.job.id == raised.value.job_id
    with pytest.raises(ServiceError) as refused:  # no job made: the key is freed
        _certify(world, Recording(), key="bad-1", n=0)
    assert refused.value.status_code == 422
    with world.db.session() as s:
        assert s.scalar(select(IdempotencyKey).where(IdempotencyKey.key == "bad-1")) is None


def test_an_evaluation_sends_its_jobs_until_the_broker_is_down(world: World) -> None:
    recording = Recording(down_after=1)
    request = evaluations.Request(PARAMS, dataset="digits:test", max_images=3)
    with world.db.session() as s, pytest.raises(BrokerUnavailable) as raised:
        dispatching.evaluate(s, world.client, request, world.settings, recording)
    assert len(recording.sent) == 1
    with world.db.session() as s:
        assert raised.value.job_id == s.scalar(select(Evaluation.id))  # the stored evaluation
        jobs = s.scalars(select(Job).where(Job.owner_id == world.client.id)).all()
        assert len(jobs) == 3
        marked = [j.id for j in jobs if j.enqueued_at is not None]
        assert marked == recording.sent  # the one sent is recorded, the rest left to the sweep
    with world.db.session() as s, pytest.raises(ServiceError) as missing:
        dispatching.replay(s, world.admin, "no-such-job", world.settings, Recording())
    assert missing.value.status_code == 404


TRAINING = Training(
    kind="finetune",
    dataset="digits:train",
    name="digits-scratch-s0.50",
    sigma=0.5,
    init="none",
    params={"arch": "tiny", "epochs": 2, "warmup_epochs": 1, "batch_size": 64, "blr": 5e-4},
)


def test_a_training_run_is_stored_and_sent(world: World) -> None:
    recording = Recording()
    with world.db.session() as s:
        run = dispatching.launch_training(s, world.admin, TRAINING, world.settings, recording)
    assert recording.trained == [run.id] and recording.sent == []
    with world.db.session() as s:
        stored = s.get(TrainingRun, run.id)
        assert stored is not None and stored.status == Status.QUEUED.value
        assert stored.enqueued_at is not None and stored.owner_id == world.admin.id
        assert stored.params["sigma"] == 0.5 and stored.params["init"] == "none"
        assert stored.dataset == "digits:train" and stored.result_name == TRAINING.name
    for wrong, status in (
        (dataclasses.replace(TRAINING, name="tiny-s0.25"), 409),  # name taken
        (dataclasses.replace(TRAINING, activate=False, default=True), 422),
        (dataclasses.replace(TRAINING, dataset="digits:nowhere"), 422),
    ):
        with world.db.session() as s, pytest.raises(ServiceError) as refused:
            dispatching.launch_training(s, world.admin, wrong, world.settings, recording)
        assert refused.value.status_code == status
    assert recording.trained == [run.id]
