"""Evaluations: certifying a whole test set through the service, one job per image.

An evaluation names its images (a server-side dataset, or an uploaded ImageFolder archive,
``domain.intake.archives``) and the parameters of ``POST /certify``. Each image becomes a job
through
the very code of single submissions (``domain.services.submissions.resolve`` and ``new_job``): the
same
input identity, derived seed and no-re-roll key, so submitting the same evaluation again re-uses
every finished certificate, and queues again, under the same seeds, only the images whose job
produced nothing. All its new jobs are queued in one go, so the engine packs them together.

Admission (``DMAE_MAX_ACTIVE_EVALUATIONS``, ``DMAE_MAX_EVALUATION_IMAGES``): an evaluation may
have at most ``max_evaluation_images`` images, and a client at most
``max_active_evaluations`` evaluations *in progress* (not cancelled, with at least one job
queued or running); one more is refused with 429, exactly, under the same lock on the client's
key as single submissions. Jobs that belong to an evaluation do not count against
``max_active_jobs`` (``domain.services.submissions.admit``), so a running evaluation does not block
a
client's single submissions, and a key's active jobs stay below ``max_active_jobs +
max_active_evaluations * max_evaluation_images``.

The status, progress and results of an evaluation are read from its jobs and their certificates
(nothing is copied): certified accuracy at r = the fraction of its images with prediction ==
label and radius >= r (abstentions count as wrong; Cohen et al. 2019, section 4), computed by
``models.evaluate`` as the CLI computes it, whose TSV rows it also writes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from domain import events, registry
from domain.config import Settings
from domain.errors import ServiceError, bad_input
from domain.intake import archives
from domain.intake.images import decode_image
from domain.keys import Caller, lock_key
from domain.services.evaluation_cap import active_evaluations, admit, too_many
from domain.services.submissions import (
    Params,
    Target,
    find,
    new_job,
    note_upload,
    requeue,
    resolve,
)
from domain.store import state
from domain.store.db import utcnow
from domain.store.state import rowcount
from domain.store.tables import (
    ACTIVE_STATUSES,
    Certificate,
    Checkpoint,
    Evaluation,
    EvaluationItem,
    Job,
    JobUpload,
    Status,
    new_id,
)
from domain.trust import signing
from models.data import (
    SKIP_INVALID,
    ImageFolderDataset,
    Skipped,
    folder_labels,
    open_inputs,
)
from models.evaluate import (
    DecisionStats,
    Row,
    average_certified_radius,
    certified_accuracy,
    curve_title,
    decision_stats,
    default_radii,
    plot_curve,
)
from models.images import Preprocessed
from models.modes import get_mode
from models.smoothing import max_radius

ATTEMPTS = 3  # an identical single submission racing in: the evaluation is stored again


MAX_SELECTION = 2**31 - 1  # skip and max are stored as 32-bit integers


@dataclass
class Request:
    """What to certify: the parameters of POST /certify, and which images of the source."""

    params: Params
    skip: int = 1
    max_images: int | None = None
    dataset: str | None = None  # digits:|mnist:train|test, or a folder in the dataset folder
    archive: IO[bytes] | None = None  # an uploaded ImageFolder archive (seekable)
    archive_name: str = ""
    # A file that is not a supported image: refuses the set (False), or is skipped and listed
    # in the evaluation's ``skipped`` with its reason (True).
    skip_invalid: bool = False


@dataclass
class Item:
    """One image: its index in the source (Cohen's ``idx``), name, label and how to load it as
    the certified input (with the sha256 of the bytes it came from)."""

    idx: int
    name: str
    label: int
    load: Callable[[], tuple[Preprocessed, str]]


# ---------------------------------------------------------------------------------- sources


def _dataset_items(
    spec: str,
    settings: Settings,
    input_size: int,
    classes: list[str],
    skipped: list[Skipped] | None,
) -> list[Item]:
    """The images of a server-side dataset; a file that is not an image by its name or outside
    the layout refuses it (422), or is appended to ``skipped`` when that is a list."""
    resolved = registry.dataset(settings.datasets, spec)
    if resolved in registry.BUILT_IN_DATASETS:
        if len(classes) != 10:
            raise bad_input(
                f"{spec} is labelled with the digits 0-9; the model has {len(classes)} classes"
            )
        inputs = open_inputs(spec, input_size)

        def digit(i: int) -> tuple[Preprocessed, str]:
            x = inputs.load(i).input
            return x, x.tensor_sha256  # no file: the bytes are the tensor's

        return [
            Item(i, inputs.name(i), int(label), partial(digit, i))
            for i, (_, label, _) in enumerate(inputs.items)
        ]
    root = Path(resolved)
    try:
        folder = ImageFolderDataset(root, input_size, classes, skip_invalid=skipped is not None)
    except ValueError as exc:  # no class folders, a folder no class, a file no image
        message = str(exc).replace(str(root), repr(spec))
        raise bad_input(message.replace(SKIP_INVALID, archives.SKIP_INVALID)) from exc
    if skipped is not None:
        skipped.extend(folder.skipped)
    base = settings.datasets.resolve()
    return [
        Item(
            i, name, label, partial(_server_file, Path(str(path)), name, base, input_size, settings)
        )  # fmt: skip
        for i, (path, label, name) in enumerate(folder.items)
    ]


def _server_file(
    path: Path, name: str, base: Path, input_size: int, settings: Settings
) -> tuple[Preprocessed, str]:
    """A file of a server-side dataset, checked exactly as an upload is."""
    if not path.resolve().is_relative_to(base):
        raise bad_input(f"{name}: the file lies outside the server's dataset folder")
    with open(path, "rb") as f:
        data = f.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise ServiceError(
            413, f"{name}: larger than the limit of {settings.max_upload_bytes} bytes"
        )
    return _decode(data, name, input_size, settings)


def _decode(data: bytes, name: str, input_size: int, settings: Settings) -> tuple[Any, str]:
    try:
        decoded = decode_image(data, input_size, settings.max_image_pixels)
    except ServiceError as exc:
        raise ServiceError(exc.status_code, f"{name}: {exc.detail}", exc.headers) from exc
    return decoded.input, decoded.sha256


def _archive_items(
    members: list[archives.Member], settings: Settings, input_size: int, classes: list[str]
) -> list[Item]:
    try:
        labels = folder_labels(sorted({m.folder for m in members}), classes, "the archive")
    except ValueError as exc:
        raise bad_input(str(exc)) from exc

    def load(m: archives.Member) -> tuple[Preprocessed, str]:
        return _decode(m.path.read_bytes(), m.name, input_size, settings)

    return [Item(i, m.name, labels[m.folder], partial(load, m)) for i, m in enumerate(members)]


def archive_limits(settings: Settings) -> archives.Limits:
    return archives.Limits(
        archive_bytes=settings.max_archive_bytes,
        members=settings.max_archive_members,
        expanded_bytes=settings.max_archive_expanded_bytes,
        member_bytes=settings.max_upload_bytes,
    )


# ---------------------------------------------------------------------------------- submit


def submit(
    session: Session, client: Caller, request: Request, settings: Settings
) -> tuple[Evaluation, list[str]]:
    """Store the evaluation and one job per image (new, re-used or re-queued); returns it and
    the ids of the jobs to send to the workers now. 4xx with a sentence for anything unusable;
    nothing is stored then."""
    p = request.params
    if p.seed is not None:
        raise bad_input("an evaluation uses the derived seeds: leave seed out")
    if not 1 <= request.skip <= MAX_SELECTION:
        raise bad_input(f"skip must lie in [1, {MAX_SELECTION}], got {request.skip}")
    if request.max_images is not None and not 1 <= request.max_images <= MAX_SELECTION:
        raise bad_input(
            f"max must lie in [1, {MAX_SELECTION}] (or be left out for all), "
            f"got {request.max_images}"
        )
    if (request.dataset is None) == (request.archive is None):
        raise bad_input("give exactly one of: dataset (on the server) or archive (an upload)")
    target = resolve(session, p, settings)
    model = session.get(Checkpoint, target.ckpt.id)
    assert model is not None
    classes = [str(c) for c in model.classes]
    cap = settings.max_active_evaluations
    if cap > 0 and (active := active_evaluations(session, client.id)) >= cap:
        raise too_many(active, cap)  # early, before reading any image
    session.rollback()  # end the read transaction: nothing is held while images are read

    evaluation_id = new_id()
    folder = settings.data_dir / "evaluations" / evaluation_id
    skipped: list[Skipped] | None = [] if request.skip_invalid else None
    try:
        if request.archive is not None:
            members = archives.unpack(request.archive, folder, archive_limits(settings), skipped)
            items = _archive_items(members, settings, target.ckpt.input_size, classes)
            source = f"archive:{Path(request.archive_name or 'upload').name}"
        else:
            assert request.dataset is not None
            items = _dataset_items(
                request.dataset, settings, target.ckpt.input_size, classes, skipped
            )
            source = request.dataset
        chosen = items[:: request.skip][: request.max_images]
        if not chosen:
            raise bad_input("no images to certify (check skip and max)")
        if len(chosen) > settings.max_evaluation_images:
            raise bad_input(
                f"{len(chosen)} images is more than the limit of "
                f"{settings.max_evaluation_images} per evaluation; take fewer with skip or max"
            )
        digest = _sha256(request.archive) if request.archive is not None else None
        for attempt in range(ATTEMPTS):
            try:
                return _store(session, client, evaluation_id, source, digest, request, target,
                              chosen, classes, settings, list(skipped or []))  # fmt: skip
            except IntegrityError:  # an identical single submission committed meanwhile
                session.rollback()
                if attempt == ATTEMPTS - 1:
                    raise
            except BaseException:  # nothing is stored; the database's write lock is released
                session.rollback()
                raise
        raise AssertionError("unreachable")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _sha256(fileobj: IO[bytes]) -> str:
    digest = hashlib.sha256()
    fileobj.seek(0)
    while chunk := fileobj.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def _store(
    session: Session,
    client: Caller,
    evaluation_id: str,
    source: str,
    archive_sha256: str | None,
    request: Request,
    target: Target,
    chosen: list[Item],
    classes: list[str],
    settings: Settings,
    skipped: list[Skipped],
) -> tuple[Evaluation, list[str]]:
    """Store the evaluation and its items. An image that cannot be decoded refuses the whole
    evaluation (4xx naming it), or with ``request.skip_invalid`` is skipped and listed with
    the members ``skipped`` already holds; an evaluation with nothing left is refused."""
    evaluation = _new_evaluation(
        client, evaluation_id, source, archive_sha256, request, target, chosen, classes
    )
    session.add(evaluation)
    secret = signing.seed_secret(settings)
    queued: dict[str, events.JobFacts] = {}
    position = 0
    for item in chosen:
        try:
            inp, input_sha256 = item.load()
        except ServiceError as exc:  # not a supported image, damaged, too many pixels
            if not request.skip_invalid or exc.status_code not in (413, 415, 422):
                raise
            skipped.append(Skipped(item.name, exc.detail.removeprefix(f"{item.name}: ")))
            continue
        job = _item_job(session, client, inp, input_sha256, request.params, target, settings,
                        secret, queued)  # fmt: skip
        session.add(
            EvaluationItem(
                evaluation_id=evaluation_id, position=position, idx=item.idx,
                name=item.name, label=item.label, job_id=job.id, input_sha256=input_sha256,
            )
        )  # fmt: skip
        position += 1
    if not position:
        raise bad_input(
            f"no image could be certified: all {len(chosen)} were skipped (first: "
            f"{skipped[0].name!r}: {skipped[0].reason})"
        )
    evaluation.total = position  # the skipped images are listed, not counted
    evaluation.skipped = [{"name": s.name, "reason": s.reason} for s in skipped]
    session.flush()
    admit(session, client.id, settings)
    session.commit()
    for job_id, facts in queued.items():
        events.job_changed(job_id, Status.QUEUED.value, facts, reason=f"evaluation {evaluation_id}")
    return evaluation, list(queued)


def _new_evaluation(
    client: Caller,
    evaluation_id: str,
    source: str,
    archive_sha256: str | None,
    request: Request,
    target: Target,
    chosen: list[Item],
    classes: list[str],
) -> Evaluation:
    """The evaluation row (not yet stored) with the parameters every item's job shares."""
    p = request.params
    return Evaluation(
        id=evaluation_id,
        owner_id=client.id,
        source=source,
        archive_sha256=archive_sha256,
        mode=p.mode,
        checkpoint_id=target.ckpt.id,
        model_name=target.ckpt.name,
        classes=classes,
        sigma=target.sigma,
        alpha=float(p.alpha),
        n0=p.selection_samples(),
        n=p.n,
        target_radius=p.target_radius,
        time_budget_s=p.time_budget_s,
        skip=request.skip,
        max_images=request.max_images,
        total=len(chosen),
    )


def _item_job(
    session: Session,
    client: Caller,
    inp: Preprocessed,
    input_sha256: str,
    p: Params,
    target: Target,
    settings: Settings,
    secret: bytes,
    queued: dict[str, events.JobFacts],
) -> Job:
    """The job of one image: a new one (flushed), or the client's identical earlier one (its
    upload noted, queued again if it produced nothing); adds those to send to ``queued``."""
    job, stored = new_job(client.id, inp, input_sha256, p, target, settings, secret)
    existing = find(session, client.id, job.request_key)
    if existing is None:
        session.add(job)
        session.add(stored)
        session.flush()
        session.expunge(stored)  # the tensor is in the database now, not needed in memory
        queued[job.id] = events.JobFacts(job.mode, job.model_name)
        return job
    note_upload(session, existing, input_sha256, inp.record())  # this file's own record
    if requeue(session, existing):
        queued[existing.id] = events.JobFacts(existing.mode, existing.model_name)
    return existing


# ---------------------------------------------------------------------------------- read


@dataclass(frozen=True)
class Outcome:
    """One finished image, as the curves need it."""

    label: int
    predict: int  # -1: abstained
    abstained: bool
    radius: float
    decision: str
    n_used: int | None
    n: int

    @property
    def correct(self) -> int:
        return int(self.label >= 0 and self.predict == self.label)


@dataclass
class Summary:
    """An evaluation's state and results, computed from its jobs and certificates."""

    status: str
    images_total: int
    images_done: int  # with a certificate
    images_failed: int  # the job failed: no certificate
    images_cancelled: int  # the job (or the evaluation) was cancelled: no certificate
    samples_done: int
    samples_total: int
    radii: list[float] | None
    accuracy: list[float] | None
    clean_accuracy: float | None
    abstention_rate: float | None
    average_certified_radius: float | None
    decisions: DecisionStats | None
    compute_s: float
    wall_s: float
    finished_at: dt.datetime | None
    error: str | None


def curve_max_radius(evaluation: Evaluation) -> float:
    """The largest radius its n and alpha can certify (at the mode's level: top-2 alpha / 2)."""
    level = get_mode(evaluation.mode).level(evaluation.alpha)
    return max_radius(evaluation.sigma, evaluation.n, level)


_SUMMARY_COLUMNS = (
    EvaluationItem.label,
    Job.status,
    Job.progress_done,
    Job.progress_total,
    Job.started_at,
    Job.finished_at,
    Job.error,
    Certificate.prediction,
    Certificate.abstained,
    Certificate.radius,
    Certificate.body["decision"].as_string(),
    Certificate.body["n_used"].as_integer(),
)


@dataclass
class _Tally:
    """What an evaluation's job rows add up to."""

    outcomes: list[Outcome] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    samples_done: int = 0
    samples_total: int = 0
    compute_s: float = 0.0
    last: dt.datetime | None = None  # the last job's end
    error: str | None = None  # the first failed or cancelled job's

    def add(self, evaluation: Evaluation, row: Any) -> None:
        """Count one row of :data:`_SUMMARY_COLUMNS`."""
        label, status, done, total, started, finished, err, pred, abstained, radius, dec, used = row
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.samples_done += int(done)
        self.samples_total += int(total)
        if status in (Status.FAILED.value, Status.CANCELLED.value) and self.error is None:
            self.error = err or status
        if finished is not None and status in (Status.SUCCEEDED.value, Status.FAILED.value):
            self.last = finished if self.last is None else max(self.last, finished)
            # Work done for this evaluation: a certificate re-used from before it is not.
            if started is not None and finished >= evaluation.created_at:
                self.compute_s += (finished - started).total_seconds()
        if status == Status.SUCCEEDED.value and radius is not None:
            predict = -1 if pred is None else int(pred)
            self.outcomes.append(Outcome(int(label), predict, bool(abstained), float(radius),
                                         dec or "", used, evaluation.n))  # fmt: skip

    def count(self, *statuses: str) -> int:
        return sum(self.statuses.get(s, 0) for s in statuses)


def summarize(session: Session, evaluation: Evaluation) -> Summary:
    """Status, progress and results of ``evaluation`` (one query over its jobs)."""
    rows = session.execute(
        select(*_SUMMARY_COLUMNS)
        .join(Job, Job.id == EvaluationItem.job_id)
        .outerjoin(Certificate, Certificate.job_id == Job.id)
        .where(EvaluationItem.evaluation_id == evaluation.id)
        .order_by(EvaluationItem.position)
    ).all()
    tally = _Tally()
    for row in rows:
        tally.add(evaluation, row)
    active = tally.count(*ACTIVE_STATUSES)
    failed, cancelled = tally.count(Status.FAILED.value), tally.count(Status.CANCELLED.value)
    missing = failed + cancelled  # images with no certificate
    last = tally.last
    if last is not None:  # all re-used: it finished when it was created, not before
        last = max(last, evaluation.created_at)
    end = last if not active and last is not None else utcnow()
    summary = Summary(
        status=_status(evaluation, tally, len(rows)), images_total=len(rows),
        images_done=len(tally.outcomes), images_failed=failed, images_cancelled=cancelled,
        samples_done=tally.samples_done, samples_total=tally.samples_total, radii=None,
        accuracy=None, clean_accuracy=None, abstention_rate=None,
        average_certified_radius=None, decisions=None, compute_s=tally.compute_s,
        wall_s=max((end - evaluation.created_at).total_seconds(), 0.0),
        finished_at=None if active else last,
        error=None if not missing else f"{missing} image(s) have no certificate; first: "
        f"{tally.error}",
    )  # fmt: skip
    if tally.outcomes:
        _results(summary, evaluation, tally.outcomes)
    return summary


def _status(evaluation: Evaluation, tally: _Tally, images: int) -> str:
    """cancelled, running / queued (some job active), failed (some image without a
    certificate) or succeeded."""
    active = tally.count(*ACTIVE_STATUSES)
    if evaluation.cancelled_at is not None:
        return Status.CANCELLED.value
    if active:
        started_any = active < images or tally.count(Status.RUNNING.value) > 0
        return Status.RUNNING.value if started_any else Status.QUEUED.value
    if tally.count(Status.FAILED.value, Status.CANCELLED.value):
        return Status.FAILED.value
    return Status.SUCCEEDED.value


def _results(summary: Summary, evaluation: Evaluation, outcomes: list[Outcome]) -> None:
    """Fill in the results of the finished images: accuracies, and the mode's curve or
    decisions."""
    mode = get_mode(evaluation.mode)
    summary.clean_accuracy = sum(o.correct for o in outcomes) / len(outcomes)
    summary.abstention_rate = sum(o.abstained for o in outcomes) / len(outcomes)
    if mode.has_curve:
        summary.radii = default_radii(curve_max_radius(evaluation))
        summary.accuracy = certified_accuracy(outcomes, summary.radii)
        summary.average_certified_radius = average_certified_radius(outcomes)
    elif mode.decides:
        summary.decisions = decision_stats(outcomes, evaluation.n, evaluation.n0)


def result_rows(session: Session, evaluation: Evaluation) -> list[Row]:
    """The TSV rows (``models.evaluate.Row``, as the CLI writes them) of the images that have a
    certificate, in the evaluation's order."""
    item = EvaluationItem
    found = session.execute(
        select(item.idx, item.label, item.name, Certificate.body, JobUpload.input_record)
        .join(Certificate, Certificate.job_id == item.job_id)
        .outerjoin(
            JobUpload,
            (JobUpload.job_id == item.job_id) & (JobUpload.input_sha256 == item.input_sha256),
        )
        .where(item.evaluation_id == evaluation.id)
        .order_by(item.position)
    ).all()
    return [row_of(idx, label, name, body, own) for idx, label, name, body, own in found]


def row_of(
    idx: int, label: int, name: str, body: dict[str, Any], upload: dict[str, Any] | None = None
) -> Row:
    """A certificate as a TSV row; ``time`` is its sampling time (selection + estimation).
    ``upload``: the record of the item's own file where it is not the job's (another file of
    the same pixels made the job): its preprocessing and warnings replace the certificate's."""
    if upload is not None:
        body = {**body, **{k: upload.get(k) for k in ("preprocessing", "warnings")}}
    timings = body.get("timings") or {}
    seconds = float(timings.get("selection_s") or 0.0) + float(timings.get("estimation_s") or 0.0)
    prediction = body.get("prediction")
    return Row(
        idx=idx,
        label=label,
        predict=-1 if prediction is None else int(prediction),
        radius=float(body["radius"]),
        time=seconds,
        count_a=int(body["count_a"]),
        n=int(body["n"]),
        pa_lower=body.get("pa_lower"),
        n0=int(body["n0"]),
        sigma=float(body["sigma"]),
        alpha=float(body["alpha"]),
        max_radius=float(body["max_radius"]),
        name=name,
        tensor_sha256=str(body.get("tensor_sha256") or ""),
        preprocessing=list(body.get("preprocessing") or []),
        warnings=list(body.get("warnings") or []),
        decision=str(body.get("decision") or ""),
        n_used=body.get("n_used"),
        target_radius=body.get("target_radius"),
        bound=str(body.get("bound") or ""),
        samples_total=body.get("samples_total"),
    )


def plot_png(evaluation: Evaluation, rows: list[Row]) -> bytes:
    """Certified accuracy against radius (``models.evaluate.plot_curve``); 409 for modes
    without a curve and while no image has a certificate."""
    no_curve = get_mode(evaluation.mode).no_curve
    if no_curve is not None:
        raise ServiceError(409, no_curve)
    if not rows:
        raise ServiceError(409, "no image has a certificate yet; try again when some are done")
    note = "" if len(rows) == evaluation.total else f"{len(rows)} of {evaluation.total} images"
    title = curve_title(evaluation.model_name, evaluation.sigma, evaluation.n, evaluation.alpha,
                        note)  # fmt: skip
    out = io.BytesIO()
    plot_curve(out, rows, title)
    return out.getvalue()


# ---------------------------------------------------------------------------------- cancel


def cancel(session: Session, evaluation: Evaluation) -> list[str]:
    """Cancel the evaluation's jobs not yet finished (a job another of the client's evaluations
    still needs is left running); returns the jobs cancelled. 409 if nothing was left to do.

    It runs under the lock on the client's key row that admissions take, and marks the
    evaluation cancelled first (SQLite: the write lock), so two cancels of evaluations sharing
    jobs run one after the other: each otherwise took the other's evaluation for one in progress
    and both left the shared jobs queued, counted by no cap."""
    lock_key(session, evaluation.owner_id)
    marked = session.execute(
        update(Evaluation)
        .where(Evaluation.id == evaluation.id, Evaluation.cancelled_at.is_(None))
        .values(cancelled_at=utcnow())
    )
    if not rowcount(marked):
        raise ServiceError(409, f"evaluation {evaluation.id} was already cancelled")
    mine = select(EvaluationItem.job_id).where(EvaluationItem.evaluation_id == evaluation.id)
    active = set(
        session.scalars(
            select(Job.id).where(Job.id.in_(mine), Job.status.in_(ACTIVE_STATUSES))
        ).all()
    )
    if not active:
        raise ServiceError(409, f"evaluation {evaluation.id} already finished; nothing to cancel")
    shared = set(
        session.scalars(
            select(EvaluationItem.job_id)
            .join(Evaluation, Evaluation.id == EvaluationItem.evaluation_id)
            .where(
                EvaluationItem.job_id.in_(active),
                EvaluationItem.evaluation_id != evaluation.id,
                Evaluation.cancelled_at.is_(None),
            )
        ).all()
    )
    facts = events.JobFacts(evaluation.mode, evaluation.model_name)
    cancelled = state.cancel_many(session, sorted(active - shared))  # commits
    for job_id in cancelled:
        events.job_changed(job_id, Status.CANCELLED.value, facts, reason="evaluation cancelled")
    return cancelled
