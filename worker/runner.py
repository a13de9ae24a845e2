"""The embedded in-process runner: worker threads inside the API process consuming job ids.

Used when no broker is configured. It runs the very same job code as the Celery task
(``worker.jobs.run_job``, ``worker.training.run_training``), so the embedded default and the
scale-out deployment produce identical certificates. On start it re-sends every queued job
(its queue lives in memory); on stop, running jobs are handed back to the queue unharmed.
"""

from __future__ import annotations

import logging
import queue
import threading

from domain.config import Settings
from domain.store.db import get_database
from worker.sweep import Sweeper, sweep_once

log = logging.getLogger("dmae.runner")

_STOP = ("stop", "")


class InProcessRunner:
    """A :class:`domain.dispatch.Dispatcher` backed by threads of this process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._queue: queue.Queue[tuple[str, str]] = queue.Queue()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, name=f"dmae-runner-{i}", daemon=True)
            for i in range(settings.runner_threads)
        ]
        self._sweeper = Sweeper(settings, self) if settings.sweep_interval_s > 0 else None

    # Dispatcher
    def certify(self, job_id: str) -> None:
        self._queue.put(("certify", job_id))

    def train(self, run_id: str) -> None:
        self._queue.put(("train", run_id))

    def backlog(self) -> int | None:
        return self._queue.qsize()

    def start(self) -> None:
        for t in self._threads:
            t.start()
        sweep_once(get_database(self.settings.database_url), self, self.settings, resend_all=True)
        if self._sweeper is not None:
            self._sweeper.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking work; running jobs stop at their next batch and go back to the queue."""
        self._stopping.set()
        if self._sweeper is not None:
            self._sweeper.stop()
        for _ in self._threads:
            self._queue.put(_STOP)
        for t in self._threads:
            if t.is_alive():
                t.join(timeout)

    def idle(self) -> bool:
        """Nothing waiting in the in-memory queue (jobs may still be running)."""
        return self._queue.empty()

    def _work(self) -> None:
        from worker.jobs import run_job
        from worker.training import run_training

        while True:
            kind, run_id = self._queue.get()
            if (kind, run_id) == _STOP or self._stopping.is_set():
                return
            try:
                if kind == "certify":
                    run_job(run_id, self.settings, should_stop=self._stopping.is_set)
                else:
                    run_training(run_id, self.settings, should_stop=self._stopping.is_set)
            except Exception:
                log.exception("%s %s crashed the runner thread's task; continuing", kind, run_id)
