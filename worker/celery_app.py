"""Celery on Redis for long GPU tasks (docs/DESIGN.md section 3).

- A task carries only the job id (task id = job id); results are ignored: Postgres holds state.
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a task whose worker process dies is
  redelivered; the attempts cap lives in the job row (``domain.store.state.claim``).
- ``worker_prefetch_multiplier = 1``: a worker reserves no more jobs than it runs.
- Redis ``visibility_timeout`` above the longest job, so a running task is never handed out twice.
- Nothing here touches CUDA: the main process imports the job code before the pool forks (so a
  new pool process is up at once), models load lazily in the process that runs the task
  (``worker.model_cache``), and a forked child drops inherited database connections.
- The main worker process runs the periodic sweep (``worker.sweep``) in a thread.

Start with ``dmae-certify worker`` or ``celery -A worker.celery_app worker``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals

from domain.config import Settings, get_settings
from domain.errors import BrokerUnavailable

log = logging.getLogger("dmae.worker")

CERTIFY_TASK = "dmae.certify"
TRAIN_TASK = "dmae.train"
PROC_ALIVE_TIMEOUT_S = 30.0


def make_celery(settings: Settings) -> Celery:
    celery = Celery("dmae", broker=settings.broker_url or "memory://")
    celery.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        result_backend=None,
        task_default_queue=settings.queue,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 1.0,
        },
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # A new pool process has this long to report that it is up before Celery kills it and
        # forks another (Celery's default is 4 s; a busy host can miss that and loop forever).
        worker_proc_alive_timeout=PROC_ALIVE_TIMEOUT_S,
    )

    @celery.task(name=CERTIFY_TASK, ignore_result=True)
    def certify_task(job_id: str) -> str:
        from worker.jobs import run_job

        return run_job(job_id, settings)

    @celery.task(name=TRAIN_TASK, ignore_result=True)
    def train_task(run_id: str) -> str:
        from worker.training import run_training

        return run_training(run_id, settings)

    return celery


class CeleryDispatcher:
    """Sends ``(task, id)`` messages; the task id is the job id and results are ignored."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = make_celery(settings)

    def _send(self, task: str, run_id: str) -> None:
        from kombu.exceptions import OperationalError

        # What ``send_task`` sends, less its per-call routing and option merging (half of its
        # CPU): Celery's task message, published on the default exchange straight to the queue.
        # The arguments' display form is given: Celery's safe repr of them was an eighth of the
        # publish's CPU (0.10 of 0.80 ms), for a list holding one id.
        message = self.app.amqp.create_task_message(
            run_id, task, [run_id], {}, argsrepr=repr([run_id]), kwargsrepr="{}"
        )
        try:
            with self.app.producer_or_acquire() as producer:
                producer.publish(
                    message.body,
                    exchange="",
                    routing_key=self.settings.queue,
                    headers=message.headers,
                    serializer="json",
                    retry=True,
                    retry_policy=self.app.conf.task_publish_retry_policy,
                    **message.properties,
                )
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


app = make_celery(get_settings())


@signals.worker_init.connect
def _load_job_code(**_: Any) -> None:
    """In the main worker process, before the pool forks: import what a job runs (torch, the
    models, the engine), so every pool process inherits it. Otherwise each new one imported it
    after the fork, several seconds on a busy host, past the deadline to report itself up: Celery
    then killed it and forked another, over and over, while the job waited. No model is loaded
    and CUDA is not touched here."""
    import worker.jobs
    import worker.model_cache
    import worker.training  # noqa: F401 - imported for the pool processes to inherit


@signals.worker_process_init.connect
def _child_started(**_: Any) -> None:
    """A forked pool child: drop the parent's pooled connections and any cached model."""
    from domain.store.db import reset_after_fork
    from worker.model_cache import CACHE

    reset_after_fork()
    CACHE.clear()


_sweeper: Any = None


@signals.worker_ready.connect
def _start_sweep(sender: Any = None, **_: Any) -> None:
    global _sweeper
    settings = get_settings()
    if settings.sweep_interval_s <= 0 or _sweeper is not None:
        return
    from worker.sweep import Sweeper

    _sweeper = Sweeper(settings, CeleryDispatcher(settings))
    _sweeper.start()


@signals.worker_shutdown.connect
def _stop_sweep(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()
