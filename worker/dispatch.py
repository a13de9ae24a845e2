"""Handing job ids to whatever runs them: Celery (a broker is configured) or the in-process
runner. The API and the sweep only see the :class:`Dispatcher` protocol."""

from __future__ import annotations

from typing import Protocol

from app.config import Settings
from app.errors import BrokerUnavailable

CERTIFY_TASK = "dmae.certify"
TRAIN_TASK = "dmae.train"


class Dispatcher(Protocol):
    def certify(self, job_id: str) -> None: ...

    def train(self, run_id: str) -> None: ...

    def backlog(self) -> int | None:
        """Messages waiting to be picked up (None: unknown)."""
        ...


class CeleryDispatcher:
    """Sends ``(task, id)`` messages; the task id is the job id and results are ignored."""

    def __init__(self, settings: Settings):
        from worker.celery_app import make_celery

        self.settings = settings
        self.app = make_celery(settings)

    def _send(self, task: str, run_id: str) -> None:
        from kombu.exceptions import OperationalError

        try:
            self.app.send_task(task, args=[run_id], task_id=run_id, queue=self.settings.queue)
        except (OperationalError, OSError, ConnectionError) as exc:
            raise BrokerUnavailable(
                f"the job queue is unavailable ({exc}); the job {run_id} is stored and will be "
                "queued automatically when it returns"
            ) from exc

    def backlog(self) -> int | None:
        """Length of the Redis list holding the queue's waiting messages (None: unknown)."""
        try:
            with self.app.connection_for_write() as conn:
                return int(conn.default_channel.client.llen(self.settings.queue))
        except Exception:  # another transport, or the broker is down
            return None

    def certify(self, job_id: str) -> None:
        self._send(CERTIFY_TASK, job_id)

    def train(self, run_id: str) -> None:
        self._send(TRAIN_TASK, run_id)
