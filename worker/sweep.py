"""The periodic sweep: nothing stays stuck, nothing runs past its attempts cap.

- A queued job or run never handed to the broker (it was down at submission) is sent once it is
  ``unsent_grace_s`` old (a submission sends its own message right after committing). One handed
  over longer than ``requeue_after_s`` ago that has still not started is sent again when the
  broker's queue is empty (its message was lost, e.g. Redis restarted without persistence, or
  sits reserved behind a long job on a busy worker, where an idle worker may now take it).
  Duplicate messages are harmless: only one claim can succeed.
- A running one whose heartbeat is older than ``stale_after_s`` lost its worker: it goes back to
  the queue, or is failed with the reason once it has used ``max_attempts``.

Several sweepers (one per worker host) may run at once: every change is a compare-and-set.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from domain import events
from domain.config import Settings
from domain.dispatch import Dispatcher
from domain.errors import ServiceError
from domain.store.db import Database, get_database, utcnow
from domain.store.state import QUEUED, RUNNING, RunTable, rowcount
from domain.store.tables import Job, Status, TrainingRun

log = logging.getLogger("dmae.sweep")

BATCH = 500


@dataclass
class SweepReport:
    resent: list[str] = field(default_factory=list)
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def sweep_once(
    db: Database, dispatcher: Dispatcher, settings: Settings, *, resend_all: bool = False
) -> SweepReport:
    """One pass over jobs and training runs. ``resend_all`` re-sends every queued one (an
    in-process runner starting with an empty queue)."""
    report = SweepReport()
    backlog = dispatcher.backlog()
    for table, send in ((Job, dispatcher.certify), (TrainingRun, dispatcher.train)):
        _sweep_table(db, table, send, settings, report, resend_all, backlog in (0, None))
    if report.resent or report.requeued or report.failed:
        log.info(
            "sweep: re-sent %d, re-queued %d, failed %d",
            len(report.resent),
            len(report.requeued),
            len(report.failed),
        )
    return report


def _sweep_table(
    db: Database,
    table: RunTable,
    send: object,
    settings: Settings,
    report: SweepReport,
    resend_all: bool,
    queue_empty: bool,
) -> None:
    assert callable(send)
    now = utcnow()
    stale = now - timedelta(seconds=settings.stale_after_s)
    requeued: list[str] = []  # this table's: sent with this table's task
    with db.session() as s:
        lost = s.execute(
            select(table.id, table.run_token, table.attempts)
            .where(table.status == RUNNING, table.heartbeat_at < stale)
            .limit(BATCH)
        ).all()
        for run_id, token, attempts in lost:
            same = (table.id == run_id, table.status == RUNNING, table.run_token == token)
            if attempts >= settings.max_attempts:
                n = rowcount(
                    s.execute(
                        update(table)
                        .where(*same)
                        .values(
                            status=Status.FAILED.value,
                            run_token=None,
                            finished_at=now,
                            error=f"gave up after {attempts} attempts: the worker running it "
                            "was lost each time (crash, out of memory, or killed)",
                        )
                    )
                )
                if n:
                    report.failed.append(run_id)
                    _event(s, table, run_id, Status.FAILED.value, "worker lost, attempts cap")
            else:
                n = rowcount(
                    s.execute(
                        update(table)
                        .where(*same)
                        .values(status=QUEUED, run_token=None, enqueued_at=None)
                    )
                )
                if n:
                    requeued.append(run_id)
                    _event(s, table, run_id, QUEUED, "worker lost")
        s.commit()

        if resend_all:
            due = table.status == QUEUED
        else:
            never_sent = table.enqueued_at.is_(None) & (
                table.created_at < now - timedelta(seconds=settings.unsent_grace_s)
            )
            resend = table.enqueued_at < now - timedelta(seconds=settings.requeue_after_s)
            due = (table.status == QUEUED) & (
                or_(never_sent, resend) if queue_empty else never_sent
            )
        ids = list(s.scalars(select(table.id).where(due).order_by(table.created_at).limit(BATCH)))
        ids += [i for i in requeued if i not in ids]
        for run_id in ids:
            try:
                send(run_id)
            except (ServiceError, OSError) as exc:
                log.warning("sweep: could not send %s: %s", run_id, exc)
                break  # the broker is down: the next sweep tries again
            s.execute(
                update(table)
                .where(table.id == run_id, table.status == QUEUED)
                .values(enqueued_at=utcnow())
            )
            s.commit()
            if run_id not in requeued:
                report.resent.append(run_id)
        report.requeued += requeued


def _event(s: Session, table: RunTable, run_id: str, status: str, reason: str) -> None:
    if table is Job:
        job = s.get(Job, run_id)
        if job is not None:
            facts = events.JobFacts(job.mode, job.model_name)
            events.job_changed(run_id, status, facts, reason=reason)


class Sweeper:
    """A daemon thread calling :func:`sweep_once` every ``sweep_interval_s`` seconds."""

    def __init__(self, settings: Settings, dispatcher: Dispatcher):
        self.settings = settings
        self.dispatcher = dispatcher
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dmae-sweep", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        db = get_database(self.settings.database_url)
        while not self._stop.is_set():
            try:
                sweep_once(db, self.dispatcher, self.settings)
            except Exception:
                log.exception("sweep failed; retrying at the next interval")
            if self._stop.wait(self.settings.sweep_interval_s or 3600):
                return
