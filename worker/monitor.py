"""The heartbeat of one running attempt: progress written to its row every few seconds, and the
signal to stop when the row says the attempt is no longer the owner (cancelled, taken over)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from domain.store.db import Database
from domain.store.state import RunTable, heartbeat

log = logging.getLogger("dmae.worker")


class Aborted(Exception):
    """Raised inside sampling when the attempt must stop (cancelled, taken over, shutdown)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Monitor:
    """Heartbeat thread of one attempt: writes progress every ``interval`` seconds and notices
    when the run stops being ours. ``progress(k)`` is the sampler's callback."""

    def __init__(
        self,
        db: Database,
        table: RunTable,
        run_id: str,
        token: str,
        interval: float,
        should_stop: Callable[[], bool] | None = None,
    ):
        self.db, self.table, self.run_id, self.token = db, table, run_id, token
        self.interval = interval
        self.should_stop = should_stop or (lambda: False)
        self.done = 0
        self.values: dict[str, Any] = {}  # more columns each heartbeat writes (e.g. metrics)
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{run_id[:8]}")
        self._thread.daemon = True

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self.db.session() as s:
                    beat = heartbeat(
                        s, self.table, self.run_id, self.token, self.done, **self.values
                    )
                    if not beat:
                        self.lost = True
                        return
            except Exception as exc:  # database briefly unavailable: keep sampling, try again
                log.warning("heartbeat of %s failed (%s); retrying", self.run_id, exc)
                continue

    def progress(self, k: int) -> None:
        self.done += k
        self.check()

    def check(self) -> None:
        if self.lost:
            raise Aborted("the job was cancelled or taken over by another worker")
        if self.should_stop():
            raise Aborted("shutdown")
