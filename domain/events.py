"""One place that records a job's state change: a log line and the matching metrics.

Every move of a job (queued, running, succeeded, failed, cancelled, requeued) is reported here
by the code that made it, so the log and ``dmae_jobs_total`` / ``dmae_job_duration_seconds``
always agree. With ``DMAE_LOG_FORMAT=json`` the fields become keys of a JSON line.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from domain import metrics

log = logging.getLogger("dmae.jobs")


class JobFacts(NamedTuple):
    """What every line about a job names besides its id."""

    mode: str
    model: str


UNKNOWN = JobFacts("unknown", "unknown")


def job_changed(
    job_id: str,
    status: str,
    facts: JobFacts,
    *,
    queue_wait_s: float | None = None,
    run_s: float | None = None,
    reason: str | None = None,
) -> None:
    """Log ``job <id> <status>`` with the job's model, mode and durations (seconds), and count
    it in ``dmae_jobs_total{mode,status}``; durations go to ``dmae_job_duration_seconds``."""
    mode, model = facts
    metrics.JOBS.labels(mode=mode, status=status).inc()
    if queue_wait_s is not None:
        metrics.JOB_SECONDS.labels(mode=mode, phase="queue_wait").observe(max(queue_wait_s, 0.0))
    if run_s is not None:
        metrics.JOB_SECONDS.labels(mode=mode, phase="run").observe(max(run_s, 0.0))
    fields: dict[str, object] = {"job_id": job_id, "status": status, "model": model, "mode": mode}
    if queue_wait_s is not None:
        fields["queue_wait_s"] = round(queue_wait_s, 6)
    if run_s is not None:
        fields["run_s"] = round(run_s, 6)
    if reason:
        fields["reason"] = reason[:500]
    text = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("job_id", "status"))
    log.info("job %s %s %s", job_id, status, text, extra=fields)
