"""Celery on Redis for long GPU tasks (docs/DESIGN.md section 3).

- A task carries only the job id (task id = job id); results are ignored: Postgres holds state.
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a task whose worker process dies is
  redelivered; the attempts cap lives in the job row (``worker.state.claim``).
- ``worker_prefetch_multiplier = 1``: a worker reserves no more jobs than it runs.
- Redis ``visibility_timeout`` above the longest job, so a running task is never handed out twice.
- Nothing here touches CUDA: models load lazily in the process that runs the task
  (``worker.model_cache``), and a forked child drops inherited database connections.
- The main worker process runs the periodic sweep (``worker.sweep``) in a thread.

Start with ``dmae-certify worker`` or ``celery -A worker.celery_app worker``.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals

from app.config import Settings, get_settings
from worker.dispatch import CERTIFY_TASK, TRAIN_TASK

log = logging.getLogger("dmae.worker")


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


app = make_celery(get_settings())


@signals.worker_process_init.connect
def _child_started(**_: Any) -> None:
    """A forked pool child: drop the parent's pooled connections and any cached model."""
    from app.db import reset_after_fork
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
    from worker.dispatch import CeleryDispatcher
    from worker.sweep import Sweeper

    _sweeper = Sweeper(settings, CeleryDispatcher(settings))
    _sweeper.start()


@signals.worker_shutdown.connect
def _stop_sweep(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()
