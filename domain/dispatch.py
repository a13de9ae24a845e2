"""Handing job ids to whatever runs them. The HTTP layer and the sweep only see the
:class:`Dispatcher` protocol; the execution layer implements it (``worker.celery_app``'s
``CeleryDispatcher`` when a broker is configured, ``worker.runner.InProcessRunner`` otherwise).

:class:`SentMarks` records, in batches, that submitted jobs were handed over
(``jobs.enqueued_at``), so a submission does not spend a database round trip of its own on it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

from domain.store import state
from domain.store.db import Database

if TYPE_CHECKING:
    from domain.config import Settings

log = logging.getLogger("dmae.api")


class Dispatcher(Protocol):
    def certify(self, job_id: str) -> None: ...

    def train(self, run_id: str) -> None: ...

    def backlog(self) -> int | None:
        """Messages waiting to be picked up (None: unknown)."""
        ...


# Opens a dispatcher for an app's lifetime (``app.main.create_app``): started with the app,
# closed at its shutdown. ``cli.asgi.default_dispatcher`` is the product's.
DispatcherFactory = Callable[["Settings"], AbstractContextManager[Dispatcher]]


class SentMarks:
    """Sets ``enqueued_at`` of jobs handed to the broker, for all jobs marked in the last
    ``interval_s`` seconds in one UPDATE (a thread of its own; :meth:`close` flushes the rest).

    Only the sweep reads ``enqueued_at``: it re-sends a queued job whose mark is missing once the
    job is ``DMAE_UNSENT_GRACE_S`` old. A mark that is late or lost (the process died before its
    flush, or the database was down for longer than ``max_pending`` marks) can therefore only
    cause one more message for that job, which is harmless: only one claim of a job can win
    (``domain.store.state.claim``)."""

    def __init__(self, db: Database, interval_s: float = 0.05, max_pending: int = 100_000):
        self.db, self.interval_s, self.max_pending = db, interval_s, max_pending
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dmae-sent-marks", daemon=True)
        self._thread.start()

    def add(self, job_id: str) -> None:
        """Mark ``job_id`` as handed to the broker (written within ``interval_s``)."""
        with self._lock:
            if len(self._pending) < self.max_pending:
                self._pending.append(job_id)

    def flush(self) -> int:
        """Write the pending marks now; returns how many were written (0 on a database error:
        they are kept and written by a later flush)."""
        with self._lock:
            ids, self._pending = self._pending, []
        if not ids:
            return 0
        try:
            with self.db.session() as s:
                state.mark_enqueued_many(s, ids)
        except Exception as exc:  # database away: try again at the next flush
            log.warning("could not record %d jobs as sent (%s); retrying", len(ids), exc)
            with self._lock:
                self._pending[:0] = ids[: self.max_pending - len(self._pending)]
            return 0
        return len(ids)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def close(self) -> None:
        """Stop the thread and write what is pending."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.flush()
