"""POST /evaluations, GET /evaluations[/{id}[/results.tsv|/plot.png]], DELETE /evaluations/{id}:
a client's evaluations (a test set certified through the service, one job per image).

The rules live in ``domain.services.evaluations``; this module translates between HTTP and them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from sqlalchemy import func, select

from app.auth import Client, SessionDep
from app.errors import error_responses
from app.routes.deps import MAX_OFFSET, DispatcherDep, SessionEndingRoute, SettingsDep
from app.schemas import (
    DecisionsOut,
    EvaluationOut,
    EvaluationPage,
    EvaluationProgress,
    EvaluationTime,
    Mode,
    RadiusAccuracy,
    SkippedFile,
    _iso,
)
from domain.errors import not_found
from domain.services import dispatching, evaluations
from domain.services.evaluations import MAX_SELECTION
from domain.services.submissions import Params
from domain.store.tables import Evaluation
from models import modes

router = APIRouter(
    route_class=SessionEndingRoute, tags=["evaluations"], responses=error_responses(401, 429, 503)
)

NO_SUCH_EVALUATION = "No such evaluation among yours."
EXAMPLE_EVALUATION: dict[str, Any] = {
    "id": "5a0c2b5e-9a51-4f0e-a3c4-2f1d6c7b8e90",
    "url": "/evaluations/5a0c2b5e-9a51-4f0e-a3c4-2f1d6c7b8e90",
    "status": "succeeded",
    "source": "digits:test",
    "archive_sha256": None,
    "mode": modes.DEFAULT,
    "model": "digits-s0.25",
    "sigma": 0.25,
    "alpha": 0.001,
    "n0": 100,
    "n": 1000,
    "target_radius": None,
    "time_budget_s": None,
    "skip": 12,
    "max": None,
    "progress": {
        "images_done": 30,
        "images_failed": 0,
        "images_cancelled": 0,
        "images_total": 30,
        "samples_done": 33000,
        "samples_total": 33000,
    },
    "skipped": [],
    "certified_accuracy": [
        {"radius": 0.0, "accuracy": 1.0},
        {"radius": 0.25, "accuracy": 0.9666666666666667},
        {"radius": 0.5, "accuracy": 0.8},
    ],
    "max_radius": 0.6161,
    "clean_accuracy": 1.0,
    "abstention_rate": 0.0,
    "average_certified_radius": 0.5312,
    "decisions": None,
    "time": {"compute_s": 7.9, "wall_s": 2.4},
    "results_url": "/evaluations/5a0c2b5e-9a51-4f0e-a3c4-2f1d6c7b8e90/results.tsv",
    "plot_url": "/evaluations/5a0c2b5e-9a51-4f0e-a3c4-2f1d6c7b8e90/plot.png",
    "created_at": "2026-01-15T10:00:00.000Z",
    "finished_at": "2026-01-15T10:00:02.400Z",
    "cancelled_at": None,
    "error": None,
}
EXAMPLE_QUEUED = {
    **EXAMPLE_EVALUATION,
    "status": "queued",
    "progress": {**EXAMPLE_EVALUATION["progress"], "images_done": 0, "samples_done": 0},
    "certified_accuracy": None,
    "max_radius": None,
    "clean_accuracy": None,
    "abstention_rate": None,
    "average_certified_radius": None,
    "time": {"compute_s": 0.0, "wall_s": 0.0},
    "finished_at": None,
}


def evaluation_out(evaluation: Evaluation, s: evaluations.Summary) -> EvaluationOut:
    url = f"/evaluations/{evaluation.id}"
    curve = None
    if s.radii is not None and s.accuracy is not None:
        curve = [RadiusAccuracy(radius=r, accuracy=a) for r, a in zip(s.radii, s.accuracy,
                                                                       strict=True)]  # fmt: skip
    d = s.decisions
    return EvaluationOut(
        id=evaluation.id,
        url=url,
        status=s.status,  # type: ignore[arg-type]
        source=evaluation.source,
        archive_sha256=evaluation.archive_sha256,
        mode=evaluation.mode,
        model=evaluation.model_name,
        sigma=evaluation.sigma,
        alpha=evaluation.alpha,
        n0=evaluation.n0,
        n=evaluation.n,
        target_radius=evaluation.target_radius,
        time_budget_s=evaluation.time_budget_s,
        skip=evaluation.skip,
        max=evaluation.max_images,
        progress=EvaluationProgress(
            images_done=s.images_done,
            images_failed=s.images_failed,
            images_cancelled=s.images_cancelled,
            images_total=s.images_total,
            samples_done=s.samples_done,
            samples_total=s.samples_total,
        ),  # fmt: skip
        skipped=[SkippedFile(**item) for item in evaluation.skipped or []],
        certified_accuracy=curve,
        max_radius=evaluations.curve_max_radius(evaluation) if curve is not None else None,
        clean_accuracy=s.clean_accuracy,
        abstention_rate=s.abstention_rate,
        average_certified_radius=s.average_certified_radius,
        decisions=None
        if d is None
        else DecisionsOut(
            certified=d.certified,
            not_certified=d.not_certified,
            undecided=d.undecided,
            certified_accuracy=d.certified_accuracy or 0.0,
            n_used_median=d.n_used_median,
            n_used_mean=d.n_used_mean,
            samples_saved=d.samples_saved,
        ),  # fmt: skip
        time=EvaluationTime(compute_s=s.compute_s, wall_s=s.wall_s),
        results_url=f"{url}/results.tsv",
        plot_url=f"{url}/plot.png",
        created_at=_iso(evaluation.created_at) or "",
        finished_at=_iso(s.finished_at),
        cancelled_at=_iso(evaluation.cancelled_at),
        error=s.error,
    )


def _load(session: SessionDep, client: Client, evaluation_id: str) -> Evaluation:
    evaluation = session.scalar(
        select(Evaluation).where(  # another client's evaluation: not found
            Evaluation.id == evaluation_id, Evaluation.owner_id == client.id
        )
    )
    if evaluation is None:
        raise not_found(f"evaluation {evaluation_id!r}")
    return evaluation


# Form fields of POST /evaluations: their descriptions are its OpenAPI schema's.
DatasetForm = Annotated[
    str | None,
    Form(
        description="A server-side dataset: digits:test, digits:train, mnist:test, "
        "mnist:train, or a folder (ImageFolder layout) inside the server's dataset folder. "
        "Give this or archive.",
        examples=["digits:test"],
    ),
]
ArchiveFile = Annotated[
    UploadFile | None,
    File(
        description="A zip or tar (.tar, .tar.gz, .tar.bz2, .tar.xz) of an ImageFolder: one "
        "folder per class, named by the model's class names, images directly inside "
        "(optionally all under one top folder). Give this or dataset."
    ),
]
SkipInvalidForm = Annotated[
    bool,
    Form(
        description="A file of the set that is not a supported image (not PNG, JPEG or "
        "WebP by its name or its bytes, damaged, outside the layout) refuses the "
        "evaluation with 422 naming it; with true it is skipped instead and listed in "
        "the evaluation's skipped. Hidden and system files (.DS_Store, __MACOSX/, "
        "Thumbs.db) are always left out."
    ),
]


@router.post(
    "/evaluations",
    status_code=202,
    response_model=EvaluationOut,
    summary="Certify a test set: a server dataset or an uploaded ImageFolder archive",
    responses={
        202: {
            "description": "Evaluation stored, its images queued.",
            "content": {"application/json": {"example": EXAMPLE_QUEUED}},
        },
        **error_responses(
            400,
            413,
            415,
            422,
            429,
            503,
            why={
                413: "Archive over DMAE_MAX_ARCHIVE_BYTES, more entries than "
                "DMAE_MAX_ARCHIVE_MEMBERS, expanding to more than "
                "DMAE_MAX_ARCHIVE_EXPANDED_BYTES, or an image over DMAE_MAX_UPLOAD_BYTES or "
                "DMAE_MAX_IMAGE_PIXELS.",
                415: "Not a zip or tar archive, or an image in it that is not a PNG, JPEG or WebP.",
                422: "Invalid parameters; an unknown dataset; an unsafe archive member (absolute "
                "path, '..', a link, a device); a folder that is no class of the model (the "
                "answer lists its classes); a corrupt image; too many images.",
                429: "Rate limit, or too many evaluations in progress for this key "
                "(see Retry-After).",
                503: "Database or job queue unavailable; retry later. An evaluation stored but "
                "not yet fully queued has its `id` in the body (the rest is queued once the "
                "broker is back).",
            },
        ),
    },
)
def create_evaluation(
    client: Client,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    dataset: DatasetForm = None,
    archive: ArchiveFile = None,
    sigma: Annotated[
        float | None,
        Form(description="Noise level; optional when a model is named.", examples=[0.25]),
    ] = None,
    model: Annotated[str | None, Form(description="A registered model name.")] = None,
    mode: Annotated[
        Mode, Form(description="certify, certify_top2, predict, or decide (with target_radius).")
    ] = modes.DEFAULT,
    alpha: Annotated[float, Form(description="Failure probability, in [1e-100, 0.5).")] = 0.001,
    n0: Annotated[
        int | None,
        Form(
            description="Selection samples per image (certify modes: default 100; decide: default "
            "0, class selection merged into the sequential test)."
        ),
    ] = None,
    n: Annotated[int, Form(description="Estimation samples per image.")] = 10_000,
    target_radius: Annotated[
        float | None, Form(description="decide only (required there): the radius decided about.")
    ] = None,
    time_budget_s: Annotated[
        float | None, Form(description="certify modes only: a time budget per image, seconds.")
    ] = None,
    skip: Annotated[
        int, Form(ge=1, le=MAX_SELECTION, description="Take every skip-th image of the set.")
    ] = 1,
    max: Annotated[
        int | None,
        Form(
            ge=1,
            le=MAX_SELECTION,
            description="At most this many images (after skip); default all.",
        ),
    ] = None,
    skip_invalid: SkipInvalidForm = False,
) -> EvaluationOut:
    """Store the evaluation and queue one job per image, each exactly like `POST /certify` (same
    preprocessing, input identity, derived seed and no-re-roll key): submitting the same
    evaluation again re-uses every finished certificate. Poll `GET /evaluations/{id}`."""
    params = Params(
        mode=mode, sigma=sigma, alpha=alpha, n0=n0, n=n, model=model,
        target_radius=target_radius, time_budget_s=time_budget_s,
    )  # fmt: skip
    request = evaluations.Request(
        params=params,
        skip=skip,
        max_images=max,
        dataset=dataset or None,
        archive=archive.file if archive is not None else None,
        archive_name=(archive.filename or "") if archive is not None else "",
        skip_invalid=skip_invalid,
    )
    evaluation = dispatching.evaluate(session, client, request, settings, dispatcher)
    return evaluation_out(evaluation, evaluations.summarize(session, evaluation))


@router.get(
    "/evaluations/{evaluation_id}",
    response_model=EvaluationOut,
    summary="Status, progress and certified accuracy of an evaluation",
    responses={
        200: {"content": {"application/json": {"example": EXAMPLE_EVALUATION}}},
        **error_responses(404, why={404: NO_SUCH_EVALUATION}),
    },
)
def get_evaluation(evaluation_id: str, client: Client, session: SessionDep) -> EvaluationOut:
    """Progress (images and samples), then over the images with a certificate: certified
    accuracy at 0, 0.25, 0.5, ... up to max_radius, clean accuracy, abstention rate, average
    certified radius (decide: the decisions), and the time and samples spent."""
    evaluation = _load(session, client, evaluation_id)
    return evaluation_out(evaluation, evaluations.summarize(session, evaluation))


@router.get(
    "/evaluations/{evaluation_id}/results.tsv",
    summary="Per-image results as TSV (Cohen et al.'s columns first)",
    response_class=Response,
    responses={
        200: {
            "description": "Header `idx label predict radius correct time decision n_used "
            "count_a n pa_lower n0 sigma alpha max_radius target_radius bound name "
            "tensor_sha256 preprocessing warnings`, one row per image with a certificate, "
            "numbers at full precision, then one footer line `# skipped<TAB>name<TAB>reason` "
            "per file skipped (skip_invalid); the CLI's --out file.",
            "content": {"text/tab-separated-values": {"schema": {"type": "string"}}},
        },
        **error_responses(404, why={404: NO_SUCH_EVALUATION}),
    },
)
def evaluation_results(evaluation_id: str, client: Client, session: SessionDep) -> Response:
    evaluation = _load(session, client, evaluation_id)
    rows = evaluations.result_rows(session, evaluation)
    from models.evaluate import tsv_text

    return Response(
        tsv_text(rows, [(s["name"], s["reason"]) for s in evaluation.skipped or []]),
        media_type="text/tab-separated-values; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="evaluation-{evaluation.id}.tsv"',
            "X-Content-Type-Options": "nosniff",
        },
    )


@router.get(
    "/evaluations/{evaluation_id}/plot.png",
    summary="Certified accuracy against radius (PNG)",
    response_class=Response,
    responses={
        200: {
            "description": "The curve, with the model, sigma, n and alpha in its title.",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
        **error_responses(
            404,
            409,
            why={
                404: NO_SUCH_EVALUATION,
                409: "A predict or decide evaluation (no curve), or no image certified yet.",
            },
        ),
    },
)
def evaluation_plot(evaluation_id: str, client: Client, session: SessionDep) -> Response:
    evaluation = _load(session, client, evaluation_id)
    png = evaluations.plot_png(evaluation, evaluations.result_rows(session, evaluation))
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get(
    "/evaluations",
    response_model=EvaluationPage,
    summary="Your evaluations, newest first",
    responses=error_responses(422),
)
def list_evaluations(
    client: Client,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, description="Page size.")] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Evaluations to skip.")] = 0,
) -> EvaluationPage:
    limit = min(limit, settings.jobs_page_max)
    where = Evaluation.owner_id == client.id
    total = session.scalar(select(func.count()).select_from(Evaluation).where(where)) or 0
    rows = session.scalars(
        select(Evaluation)
        .where(where)
        .order_by(Evaluation.created_at.desc(), Evaluation.id)
        .limit(limit)
        .offset(offset)
    ).all()
    items = [evaluation_out(e, evaluations.summarize(session, e)) for e in rows]
    return EvaluationPage(items=items, total=total, limit=limit, offset=offset)


@router.delete(
    "/evaluations/{evaluation_id}",
    response_model=EvaluationOut,
    summary="Cancel an evaluation's images not yet finished",
    responses=error_responses(
        404, 409, why={404: NO_SUCH_EVALUATION, 409: "Already finished or cancelled."}
    ),
)
def cancel_evaluation(evaluation_id: str, client: Client, session: SessionDep) -> EvaluationOut:
    """Queued images never run, running ones stop at their next batch; finished ones keep their
    certificates (a job another of your evaluations still needs keeps running). Submitting the
    evaluation again queues the cancelled images anew, under the same seeds."""
    evaluation = _load(session, client, evaluation_id)
    evaluations.cancel(session, evaluation)
    session.refresh(evaluation)
    return evaluation_out(evaluation, evaluations.summarize(session, evaluation))
