"""POST /certify, GET /jobs, GET /jobs/{id}, DELETE /jobs/{id}: a client's certification jobs."""

from __future__ import annotations

import enum
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, Query, Response, UploadFile
from sqlalchemy import exists, func, select

from app.auth import Client, SessionDep
from app.errors import error_responses
from app.routes.deps import MAX_OFFSET, DispatcherDep, SentMarksDep, SessionEndingRoute, SettingsDep
from app.schemas import JobOut, JobPage, Mode, job_out, json_response
from app.upload_files import read_upload
from domain import events
from domain.errors import ServiceError, not_found
from domain.services import dispatching, idempotency
from domain.services.submissions import Params
from domain.store import state
from domain.store.tables import Certificate, EvaluationItem, Job, Status
from models import modes

router = APIRouter(
    route_class=SessionEndingRoute, tags=["certification"], responses=error_responses(401, 429, 503)
)

EXAMPLE_CERTIFICATE: dict[str, Any] = {
    "mode": modes.DEFAULT,
    "prediction": 7,
    "label": "7",
    "abstained": False,
    "abstain_reason": None,
    "radius": 0.6312,
    "pa_lower": 0.9942,
    "pb_upper": None,
    "count_a": 9991,
    "count_b": None,
    "counts": [0, 2, 0, 1, 0, 0, 0, 9991, 3, 3],
    "n0": 100,
    "n": 10000,
    "alpha": 0.001,
    "sigma": 0.25,
    "max_radius": 0.7998,
    "seed": 4171520194651379,
    "pvalue": None,
    "input_shape": [3, 8, 8],
    "space": "[0,1] RGB pixels after the service's resize/crop to the model's input "
    "(input_shape), before mean/std normalisation; radii of models with different input "
    "sizes are not comparable",
    "model": "digits-s0.25",
    "checkpoint_sha256": "9f2c...",
    "weights_sha256": "51be...",
    "input_sha256": "e3b0...",
    "tensor_sha256": "5d1c...",
    "original_size": [8, 8],
    "scale": 1.0,
    "preprocessing": ["decode PNG RGB 8x8", "8-bit RGB / 255", "no resize: already 8x8"],
    "warnings": [],
    "device": "cpu",
    "timings": {
        "selection_s": 0.02,
        "estimation_s": 1.9,
        "samples_per_s": 5200.0,
        "queued_s": 0.01,
        "model_load_s": 0.0,
        "run_s": 1.95,
    },
}
EXAMPLE_JOB: dict[str, Any] = {
    "id": "0b6f3c1e-3f0e-4d53-9f5e-2d0a3b9c7e11",
    "url": "/jobs/0b6f3c1e-3f0e-4d53-9f5e-2d0a3b9c7e11",
    "status": "succeeded",
    "mode": modes.DEFAULT,
    "model": "digits-s0.25",
    "sigma": 0.25,
    "alpha": 0.001,
    "n0": 100,
    "n": 10000,
    "seed": 4171520194651379,
    "input_sha256": "e3b0...",
    "tensor_sha256": "5d1c...",
    "input_shape": [3, 8, 8],
    "original_size": [8, 8],
    "scale": 1.0,
    "preprocessing": ["decode PNG RGB 8x8", "8-bit RGB / 255", "no resize: already 8x8"],
    "warnings": [],
    "progress": {"done": 10100, "total": 10100},
    "attempts": 1,
    "created_at": "2026-01-15T10:00:00.000Z",
    "started_at": "2026-01-15T10:00:00.020Z",
    "finished_at": "2026-01-15T10:00:02.000Z",
    "error": None,
    "certificate": EXAMPLE_CERTIFICATE,
}
EXAMPLE_QUEUED = {
    **EXAMPLE_JOB,
    "status": "queued",
    "progress": {"done": 0, "total": 10100},
    "attempts": 0,
    "started_at": None,
    "finished_at": None,
    "certificate": None,
}

NO_SUCH_JOB = "No such job among yours."


# The form fields and header of POST /certify: their descriptions are its OpenAPI schema's.
SigmaForm = Annotated[
    float | None,
    Form(
        description="Noise level (L2, in [0,1] pixel units). Picks the active model "
        "trained for it. Optional when a model is named (then that model's training "
        "sigma); one of the two is required.",
        examples=[0.25],
    ),
]
N0Form = Annotated[
    int | None,
    Form(
        description="Selection samples (certify modes: default 100; decide: default "
        "0, class selection merged into the sequential test)."
    ),
]
NForm = Annotated[
    int,
    Form(description="Estimation samples; at least the mode's minimum for alpha (422 gives it)."),
]
ModeForm = Annotated[
    Mode,
    Form(
        description="certify (CERTIFY), predict (PREDICT), certify_top2, or decide (is the "
        "input certified at target_radius? sampled sequentially, n is the cap)."
    ),
]
TargetRadiusForm = Annotated[
    float | None,
    Form(
        description="decide only (required there): the L2 radius to decide about. The job "
        "stops as soon as an anytime-valid confidence sequence settles it.",
        examples=[0.25],
    ),
]
TimeBudgetForm = Annotated[
    float | None,
    Form(
        description="certify modes only: stop sampling after this many seconds; a run "
        "stopped before n takes its radius from the anytime-valid bound (see `bound`).",
    ),
]
SeedForm = Annotated[
    int | None,
    Form(
        description="Noise seed. Default: derived from the preprocessed tensor's hash, the "
        "model and the parameters, so the same submission is always the same pre-committed "
        "run."
    ),
]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias=idempotency.HEADER,
        description="Optional client-chosen key (e.g. a UUID) making retries safe: the same "
        "key and request return the same job; the same key with another request is 422; "
        "while the first request is in flight, 409.",
    ),
]


@router.post(
    "/certify",
    status_code=202,
    response_model=JobOut,
    summary="Submit an image for certification",
    responses={
        202: {
            "description": "Job queued.",
            "content": {"application/json": {"example": EXAMPLE_QUEUED}},
        },
        200: {
            "model": JobOut,
            "description": "The identical request was submitted before (or this Idempotency-Key "
            "was): the stored job (with its certificate once it succeeded) is returned; no new "
            "noise is drawn.",
            "content": {"application/json": {"example": EXAMPLE_JOB}},
        },
        **error_responses(
            400,
            409,
            413,
            415,
            422,
            429,
            503,
            why={
                409: "A request with this Idempotency-Key is still in flight (see Retry-After).",
                413: "Upload larger than DMAE_MAX_UPLOAD_BYTES, or image (width x height) over "
                "DMAE_MAX_IMAGE_PIXELS.",
                415: "Not a PNG, JPEG or WebP image.",
                422: "Invalid parameters, no model for that sigma, a corrupt image, or an "
                "Idempotency-Key reused for another request.",
                429: "Rate limit, or too many jobs queued or running for this key "
                "(see Retry-After).",
                503: "Database or job queue unavailable; retry later. A job stored but not yet "
                "queued has its `id` in the body (it is queued once the broker is back).",
            },
        ),
    },
)
def certify(
    client: Client,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    sent: SentMarksDep,
    image: Annotated[UploadFile, File(description="PNG, JPEG or WebP image.")],
    sigma: SigmaForm = None,
    alpha: Annotated[float, Form(description="Failure probability, in [1e-100, 0.5).")] = 0.001,
    n0: N0Form = None,
    n: NForm = 10_000,
    mode: ModeForm = modes.DEFAULT,
    target_radius: TargetRadiusForm = None,
    time_budget_s: TimeBudgetForm = None,
    model: Annotated[str | None, Form(description="A registered model name.")] = None,
    seed: SeedForm = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Queue a PREDICT/CERTIFY job on the uploaded image and answer 202 with its id and URL.

    The image is converted to the model's input as a viewer shows it (EXIF orientation,
    transparency composited on white, every bit depth mapped to [0,1], the centred square
    resized to the model's input size); the job and certificate record the steps
    (`preprocessing`), `original_size`, `scale` and `warnings`, and the certificate states the
    space and shape its radius refers to. Submitting the same pixels (in any encoding), model
    and parameters again returns the stored job (200) instead of drawing new noise.
    """
    data = read_upload(image, settings.max_upload_bytes, "image upload")
    params = Params(
        mode=mode, sigma=sigma, alpha=alpha, n0=n0, n=n, seed=seed, model=model,
        target_radius=target_radius, time_budget_s=time_budget_s,
    )  # fmt: skip
    done = dispatching.certify(
        session, client, data, params, settings, dispatcher, sent, idempotency_key
    )
    out = job_out(done.job, done.certificate, done.upload)
    if done.outcome is dispatching.Outcome.REPLAYED:
        return json_response(out, 200, {"Idempotent-Replayed": "true"})
    return json_response(out, 202 if done.outcome is dispatching.Outcome.QUEUED else 200)


@router.get(
    "/jobs/{job_id}",
    response_model=JobOut,
    summary="Status, progress and certificate of a job",
    responses={
        200: {"content": {"application/json": {"example": EXAMPLE_JOB}}},
        **error_responses(
            404,
            422,
            why={
                404: f"{NO_SUCH_JOB} Or no upload of its input has the given sha256.",
                422: "upload is not a sha256 (64 lowercase hex digits).",
            },
        ),
    },
)
def get_job(
    job_id: str,
    client: Client,
    session: SessionDep,
    upload: Annotated[
        str | None,
        Query(
            description="sha256 of an upload of this job's input (as the `url` of its answer "
            "gives it): the job as that upload sees it, with its own input_sha256, "
            "original_size, scale, preprocessing and warnings.",
            pattern="^[0-9a-f]{64}$",
        ),
    ] = None,
) -> Response:
    """The job's ``status`` (queued, running, succeeded, failed, cancelled), ``progress``, and
    its ``certificate`` once it succeeded (``error`` if it failed)."""
    # One statement needs no transaction: autocommit spares the BEGIN and ROLLBACK round trips.
    session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    job, body = dispatching.owned_job(session, client.id, job_id)
    view = None
    if upload is not None and upload != job.input_sha256:
        view = dispatching.upload_view(session, job, upload)
        if view is None:
            raise not_found(f"upload {upload!r} of job {job_id!r}")
    out = job_out(job, body, view)
    session.close()  # returns the connection here, in the route's thread
    return json_response(out)


class EvaluationJobs(enum.StrEnum):
    """Which jobs ``GET /jobs`` lists, by whether they certify an image of an evaluation."""

    INCLUDE = "include"  # every job (the listing before the filter existed)
    EXCLUDE = "exclude"  # the jobs of single requests and replays only
    ONLY = "only"  # the per-image jobs of evaluations only


@router.get(
    "/jobs",
    response_model=JobPage,
    summary="Your jobs, newest first",
    responses=error_responses(422),
)
def list_jobs(
    client: Client,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, description="Page size.")] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Jobs to skip.")] = 0,
    status: Annotated[Status | None, Query(description="Only jobs in this status.")] = None,
    evaluations: Annotated[
        EvaluationJobs,
        Query(
            description="The per-image jobs of evaluations: include (every job), exclude (only "
            "single requests and replays) or only (only the jobs of evaluations)."
        ),
    ] = EvaluationJobs.INCLUDE,
) -> JobPage:
    """The caller's jobs, newest first. Each item's ``evaluations`` names the evaluations whose
    images it certifies (empty for a single request or a replay)."""
    limit = min(limit, settings.jobs_page_max)
    where = [Job.owner_id == client.id]
    if status is not None:
        where.append(Job.status == status.value)
    in_evaluation = exists().where(EvaluationItem.job_id == Job.id)
    if evaluations is EvaluationJobs.EXCLUDE:
        where.append(~in_evaluation)
    elif evaluations is EvaluationJobs.ONLY:
        where.append(in_evaluation)
    total = session.scalar(select(func.count()).select_from(Job).where(*where)) or 0
    rows = session.execute(
        select(Job, Certificate.body)
        .outerjoin(Certificate, Certificate.job_id == Job.id)
        .where(*where)
        .order_by(Job.created_at.desc(), Job.id)
        .limit(limit)
        .offset(offset)
    ).all()
    served: dict[str, list[str]] = {}
    if rows:
        for job_id, evaluation_id in session.execute(
            select(EvaluationItem.job_id, EvaluationItem.evaluation_id)
            .distinct()
            .where(EvaluationItem.job_id.in_([j.id for j, _ in rows]))
            .order_by(EvaluationItem.job_id, EvaluationItem.evaluation_id)
        ):
            served.setdefault(job_id, []).append(evaluation_id)
    items = [job_out(j, b, evaluations=served.get(j.id, [])) for j, b in rows]
    return JobPage(items=items, total=total, limit=limit, offset=offset)


@router.delete(
    "/jobs/{job_id}",
    response_model=JobOut,
    summary="Cancel a queued or running job",
    responses=error_responses(404, 409, why={404: NO_SUCH_JOB, 409: "The job already finished."}),
)
def cancel_job(job_id: str, client: Client, session: SessionDep) -> JobOut:
    """Cancel the job: a queued job never runs, a running one stops at its next batch. A job
    that already finished keeps its result (409)."""
    job, _ = dispatching.owned_job(session, client.id, job_id)
    if not state.cancel(session, Job, job.id):
        session.refresh(job)
        raise ServiceError(409, f"job {job.id} already {job.status}; nothing to cancel")
    session.refresh(job)
    events.job_changed(job.id, Status.CANCELLED.value, events.JobFacts(job.mode, job.model_name))
    body = session.scalar(select(Certificate.body).where(Certificate.job_id == job.id))
    return job_out(job, body)
