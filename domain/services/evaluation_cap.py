"""The evaluation cap (``DMAE_MAX_ACTIVE_EVALUATIONS``): how many evaluations a client has in
progress, and the admission that refuses one more. Used by ``POST /evaluations``
(``domain.services.evaluations``) and by a single submission that queues an evaluation's job again
(``domain.services.submissions``), which would otherwise import each other."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from domain.config import Settings
from domain.errors import ADMISSION_RETRY_S, ServiceError
from domain.keys import lock_key
from domain.store.tables import ACTIVE_STATUSES, Evaluation, EvaluationItem, Job


def active_evaluations(session: Session, owner_id: int) -> int:
    """The client's evaluations in progress: not cancelled, with a job queued or running."""
    count = session.scalar(
        select(func.count(func.distinct(EvaluationItem.evaluation_id)))
        .select_from(Job)
        .join(EvaluationItem, EvaluationItem.job_id == Job.id)
        .join(Evaluation, Evaluation.id == EvaluationItem.evaluation_id)
        .where(
            Job.owner_id == owner_id,
            Job.status.in_(ACTIVE_STATUSES),
            Evaluation.cancelled_at.is_(None),
        )
    )
    return int(count or 0)


def admit(session: Session, owner_id: int, settings: Settings) -> None:
    """Call after writing an evaluation and its items (not yet committed): rolls back and raises
    429 when the client now has more than ``max_active_evaluations`` in progress. The count runs
    under the lock single submissions take on the client's key row
    (``domain.services.submissions.admit``), held to the caller's commit, so concurrent submissions
    are
    counted one after another and cannot overshoot."""
    cap = settings.max_active_evaluations
    if cap <= 0:
        return
    lock_key(session, owner_id)
    active = active_evaluations(session, owner_id)
    if active > cap:
        session.rollback()
        raise too_many(active - 1, cap)


def too_many(active: int, cap: int) -> ServiceError:
    return ServiceError(
        429,
        f"too many evaluations in progress: this API key has {active} with images queued or "
        f"running (at most {cap}); wait for one to finish or cancel it",
        {"Retry-After": str(ADMISSION_RETRY_S)},
    )
