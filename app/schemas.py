"""Response and request bodies of the HTTP API (the names are the public contract)."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from domain.store.tables import Checkpoint, Job, TrainingRun
from models.modes import MODES

if TYPE_CHECKING:  # a registered name (models.modes.MODES): pydantic checks it at run time
    Mode = str
else:  # the registry's names in its order: the OpenAPI schema's enum
    Mode = Literal[tuple(MODES)]


def json_response(
    body: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """``body`` as the route's JSON response, serialised in the route's worker thread (a
    returned model would be validated and serialised again by FastAPI, in one more thread
    hand-off). The route keeps ``response_model`` for its OpenAPI schema."""
    return Response(
        body.model_dump_json(by_alias=True),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.isoformat(timespec="milliseconds") + "Z"


class Progress(BaseModel):
    done: int = Field(description="Noisy samples evaluated so far (selection + estimation).")
    total: int = Field(description="Samples the job draws in all: n0 + n (n for predict).")


class AsStored(BaseModel):
    """A stored JSON body served exactly as stored: optional fields it lacks are left out rather
    than shown as null, so a signed certificate's bytes still verify after the round trip."""

    model_config = ConfigDict(extra="allow")

    # No return annotation: pydantic would take it as the serialised schema (``Any``: {}).
    @model_serializer(mode="wrap")
    def _as_stored(self, handler: SerializerFunctionWrapHandler):
        data = handler(self)
        if not isinstance(data, dict):
            return data
        fields = type(self).model_fields
        absent = {
            f.alias or name for name, f in fields.items() if name not in self.model_fields_set
        }
        return {k: v for k, v in data.items() if k not in absent}


class Timings(AsStored):
    """Where a job's time went, in seconds (``samples_per_s``: noisy samples per second)."""

    model_config = ConfigDict(extra="allow")

    selection_s: float | None = Field(
        None, description="Drawing the n0 selection samples (certify modes only)."
    )
    estimation_s: float = Field(description="Drawing the n estimation samples.")
    samples_per_s: float = Field(description="Noisy samples evaluated per second.")
    queued_s: float = Field(description="From submission until a worker started the job.")
    model_load_s: float = Field(description="Loading the model (0 when it was cached).")
    run_s: float = Field(description="From start to the stored certificate.")


class CertificateOut(AsStored):
    """The result of one pre-committed PREDICT/CERTIFY run; ``radius`` is an L2 radius in
    ``space``, on a tensor of shape ``input_shape``. Signed by the service (``signature``,
    ``key_id``; public keys at ``GET /keys``): served exactly as stored and signed. Certificates
    made before signing lack the fields from ``job_id`` on."""

    mode: str
    prediction: int | None = Field(description="Class index; null when the model abstained.")
    label: str | None = Field(description="Class name of the prediction (null when abstained).")
    abstained: bool
    abstain_reason: str | None
    radius: float = Field(description="Certified L2 radius (0 when abstained or in predict).")
    pa_lower: float | None = Field(description="(1-alpha) lower confidence bound on pA.")
    pb_upper: float | None = None
    count_a: int
    count_b: int | None = None
    counts: list[int]
    n0: int
    n: int
    alpha: float
    sigma: float
    max_radius: float = Field(description="Largest radius n samples at this alpha can certify.")
    seed: int
    pvalue: float | None = None
    bound: str | None = Field(
        None,
        description="The bound behind pa_lower: 'clopper-pearson' (one-sided, at n) or "
        "'beta-binomial-mixture-cs' (the anytime-valid confidence sequence: decide, or a "
        "certify run stopped early by its time budget). Null for predict.",
    )
    n_used: int | None = Field(
        None, description="Estimation samples actually drawn (n is the cap in decide mode)."
    )
    decision: str | None = Field(
        None,
        description="decide: 'certified' (radius >= target_radius with prob. >= 1 - alpha), "
        "'not_certified' (the true radius is below target_radius, same confidence), or "
        "'undecided' (n spent first).",
    )
    target_radius: float | None = Field(None, description="decide: the radius decided about.")
    pa_upper: float | None = Field(
        None, description="decide: upper confidence bound of the most frequent class's pA."
    )
    samples_total: int | None = Field(
        None,
        description="Every forward pass the run drew, selection included (n0 + n_used). Absent "
        "from certificates issued before it was recorded.",
    )
    predictable_hits: int | None = Field(
        None,
        description="decide with n0 = 0: hits of the predictable class (the most frequent class "
        "before each chunk) over samples 2..n_used, the count the merged test uses.",
    )
    input_shape: list[int]
    space: str
    model: str
    checkpoint_sha256: str = Field(description="sha256 of the checkpoint file.")
    weights_sha256: str = Field(
        description="sha256 of the model's tensors (the same weights in another file format "
        "have the same value)."
    )
    input_sha256: str = Field(description="sha256 of the uploaded bytes.")
    tensor_sha256: str | None = Field(
        None,
        description="sha256 of the preprocessed float32 tensor (little-endian, C order): the "
        "input's identity. The same pixels in another file format have the same hash.",
    )
    original_size: list[int] | None = Field(
        None, description="[width, height] of the upload as displayed (after EXIF orientation)."
    )
    scale: float | None = Field(
        None, description="Output pixels per source pixel, S / min(width, height); < 1: shrunk."
    )
    preprocessing: list[str] = Field(
        default_factory=list, description="The ordered steps that made the certified tensor."
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="What a reader should know, e.g. the input is far from the model's domain.",
    )
    recipe: str | None = Field(
        None, description="How the model was trained (see GET /models); null when unknown."
    )
    label_source: str | None = Field(
        None, description="Where the class names come from when the model file stores none."
    )
    device: str = Field(
        description="Where the samples were drawn: counts are reproducible per kind of device."
    )
    timings: Timings
    job_id: str | None = Field(None, description="The job that made it (one certificate a job).")
    seed_source: Literal["derived", "client", "unknown"] | None = Field(
        None,
        description="derived: HMAC of the input and parameters under the server's secret (not "
        "predictable before submission); client: chosen by the client (could have been tried "
        "offline first).",
    )
    prior_runs: int | None = Field(
        None,
        description="Certificates this service issued before this one to the same client for "
        "the same tensor and model, any seed or parameters: 0 for a first run.",
    )
    issued_at: str | None = Field(None, description="When it was signed (UTC, ISO 8601).")
    version: str | None = Field(None, description="Version of the service that issued it.")
    schema_: int | None = Field(
        None, alias="schema", description="Certificate schema version (2: signed)."
    )
    key_id: str | None = Field(
        None, description="Signing key: first 16 hex digits of sha256 of the raw public key."
    )
    signature: str | None = Field(
        None,
        description="Base64 Ed25519 signature of the RFC 8785 (JCS) form of every other field.",
    )


class ReplayOut(BaseModel):
    """What a replay found: the original job re-run with its seed, model and parameters."""

    replay_of: str = Field(description="The replayed job.")
    identical: bool = Field(
        description="Counts, the selected class's count and the prediction all as certified."
    )
    counts: list[int]
    original_counts: list[int]
    differing_classes: list[int] = Field(description="Classes whose counts differ.")
    count_a: int
    original_count_a: int | None
    prediction: int | None
    original_prediction: int | None
    radius: float
    original_radius: float | None
    device: str = Field(description="Where the replay drew its samples.")
    original_device: str
    same_device_kind: bool = Field(
        description="Counts are reproducible per kind of device (CUDA runs bf16, CPU float32): "
        "across kinds they may differ without anything being wrong."
    )


class SigningKeyOut(BaseModel):
    key_id: str = Field(description="First 16 hex digits of sha256 of the raw public key.")
    algorithm: Literal["Ed25519"]
    public_key_pem: str = Field(description="SubjectPublicKeyInfo PEM.")
    public_key: str = Field(description="The raw 32-byte public key, base64.")
    current: bool = Field(description="Signs new certificates (the others signed earlier ones).")


class SigningKeysOut(BaseModel):
    """The public keys certificates are signed with, and how to check a signature."""

    keys: list[SigningKeyOut]
    canonicalization: str
    signature: str


class ErrorOut(BaseModel):
    """Every error answer: ``detail`` says what is wrong in one sentence."""

    detail: str = Field(description="What is wrong, as a sentence for a person.")


class FieldError(BaseModel):
    """One problem with one field of the request."""

    loc: list[str | int] = Field(description="Where: e.g. ['query', 'limit'] or ['body', 'n'].")
    msg: str = Field(description="What is wrong with it.")
    type: str = Field(description="A machine-readable kind, e.g. 'greater_than_equal'.")


class ValidationErrorOut(ErrorOut):
    """422: ``detail`` joins one sentence per problem; ``errors`` lists them per field when the
    request's fields did not validate (absent when the content itself was unusable, e.g. a
    corrupt image or no model for that sigma)."""

    errors: list[FieldError] = Field(
        default_factory=list, description="One entry per invalid field."
    )


class UnavailableOut(ErrorOut):
    """503: the database or the job queue is unavailable; retry after ``Retry-After`` seconds."""

    id: str | None = Field(
        None,
        description="POST /certify only: the job was stored but could not be queued yet; it is "
        "queued once the broker is back; poll /jobs/{id}.",
    )


class JobOut(BaseModel):
    id: str
    url: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    mode: str
    model: str
    sigma: float
    alpha: float
    n0: int
    n: int
    seed: int
    input_sha256: str = Field(
        description="sha256 of the uploaded bytes. Another upload of the same pixels (other "
        "bytes, same tensor) reaches the same job; its answer and `url` (`?upload=`) show its "
        "own input_sha256, original_size, scale, preprocessing and warnings."
    )
    tensor_sha256: str = Field(
        description="sha256 of the preprocessed float32 tensor: the input's identity (no "
        "re-roll, derived seed). Empty for jobs made before it was recorded."
    )
    input_shape: list[int]
    original_size: list[int] | None = Field(
        description="[width, height] of the upload as displayed (after EXIF orientation)."
    )
    scale: float | None = Field(description="S / min(width, height): below 1 the image shrank.")
    preprocessing: list[str] = Field(description="The ordered preprocessing steps.")
    warnings: list[str] = Field(description="E.g. 'downscaled 53x to the model's 8x8 input'.")
    progress: Progress
    attempts: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: str | None = None
    certificate: CertificateOut | None = None
    seed_source: str | None = Field(
        None, description="derived or client ('' for jobs made before it was recorded)."
    )
    replay_of: str | None = Field(None, description="For a replay: the job it re-runs.")
    replay: ReplayOut | None = Field(None, description="For a finished replay: what it found.")
    evaluations: list[str] | None = Field(
        None,
        description="GET /jobs only: the evaluations whose images this job certifies (empty for "
        "a single request or a replay; null in other answers).",
    )
    target_radius: float | None = Field(
        None, description="decide jobs: the L2 radius decided about (null for other modes)."
    )
    time_budget_s: float | None = Field(
        None, description="certify jobs: the time budget asked for, seconds (null: none)."
    )


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class ModelOut(BaseModel):
    name: str
    kind: str = Field(description="classifier (serves requests) or pretrain.")
    sigma: float | None = Field(description="Noise level the model was trained for.")
    classes: list[str]
    num_classes: int
    input_size: int = Field(description="Side S of the S x S [0,1] RGB tensor it certifies.")
    licence: str
    source: str
    recipe: str | None = Field(
        None,
        description="How it was trained: dmae+consistency (DMAE pre-training, consistency "
        "fine-tuning), mae+consistency, scratch+consistency, scratch+gaussian (Cohen et al.), "
        "or a pre-training recipe; null when the file does not say (e.g. official files).",
    )
    format: str
    active: bool
    default: bool = Field(
        description="The default model of its sigma: a request with that sigma and no model "
        "runs on it. Set by an admin (POST /admin/models/{name}/default), never by registering."
    )
    checkpoint_sha256: str
    arch: dict[str, Any]
    created_at: str


class TrainingIn(BaseModel):
    """A training run: pre-training (DMAE) or fine-tuning a classifier at one sigma."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["pretrain", "finetune"]
    dataset: str = Field(
        description="'digits:train', 'mnist:train', or a folder inside the server's dataset "
        "directory (ImageFolder layout: one sub-folder per class)."
    )
    name: str = Field(description="Registry name of the resulting checkpoint.")
    sigma: float = Field(
        0.25,
        ge=0,
        allow_inf_nan=False,
        description="Training noise level: > 0 for fine-tuning; pre-training also accepts 0 "
        "(MAE without noise, the ablation's baseline).",
    )
    init: str | None = Field(
        None,
        description="Fine-tuning: the registered pre-trained model to start from, or 'none' "
        "for a randomly initialised encoder of params.arch (the from-scratch baselines).",
    )
    params: dict[str, float | int | str | bool] = Field(
        default_factory=dict,
        description="Hyper-parameters passed to the training pipeline (epochs, lr, batch_size, "
        "preset, ...).",
    )
    activate: bool = Field(
        True,
        description="Activate the model once registered: requests can name it. It serves "
        "requests that name no model only if it is also made the default.",
    )
    default: bool = Field(
        False,
        description="Make the result the default model of its sigma once registered (requests "
        "with that sigma and no model then run on it). Needs activate.",
    )


class TrainingOut(BaseModel):
    id: str
    url: str
    status: str
    kind: str
    dataset: str
    name: str
    params: dict[str, Any]
    progress: Progress
    attempts: int
    metrics: dict[str, Any]
    model: str | None = Field(description="The registered result, once the run succeeded.")
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: str | None


class TrainingPage(BaseModel):
    items: list[TrainingOut]
    total: int
    limit: int
    offset: int


def job_out(
    job: Job,
    certificate: dict[str, Any] | None,
    upload: tuple[str, dict[str, Any]] | None = None,
    evaluations: list[str] | None = None,
) -> JobOut:
    """The job as its answer shows it; ``upload`` (bytes sha256, record): as seen by that upload
    of the job's input, with its own preprocessing and warnings (``?upload=`` in its URL);
    ``evaluations``: the ids of the evaluations the job serves (history listings only)."""
    sha, record = upload if upload else (job.input_sha256, dict(job.input_record or {}))
    return JobOut(
        id=job.id,
        url=f"/jobs/{job.id}" + (f"?upload={sha}" if upload else ""),
        status=job.status,  # type: ignore[arg-type]
        mode=job.mode,
        model=job.model_name,
        sigma=job.sigma,
        alpha=job.alpha,
        n0=job.n0,
        n=job.n,
        seed=job.seed,
        input_sha256=sha,
        tensor_sha256=job.tensor_sha256,
        input_shape=list(job.input_shape),
        original_size=record.get("original_size"),
        scale=record.get("scale"),
        preprocessing=list(record.get("preprocessing", [])),
        warnings=list(record.get("warnings", [])),
        progress=Progress(done=job.progress_done, total=job.progress_total),
        attempts=job.attempts,
        created_at=_iso(job.created_at) or "",
        started_at=_iso(job.started_at),
        finished_at=_iso(job.finished_at),
        error=job.error,
        certificate=CertificateOut(**certificate) if certificate else None,
        seed_source=job.seed_source,
        replay_of=job.replay_of,
        replay=ReplayOut(**job.replay_result) if job.replay_result else None,
        evaluations=evaluations,
        target_radius=job.target_radius,
        time_budget_s=job.time_budget_s,
    )


def model_out(row: Checkpoint) -> ModelOut:
    return ModelOut(
        name=row.name,
        kind=row.kind,
        sigma=row.sigma,
        classes=[str(c) for c in row.classes],
        num_classes=row.num_classes,
        input_size=row.input_size,
        licence=row.licence,
        source=row.source,
        recipe=row.recipe,
        format=row.format,
        active=row.active,
        default=row.is_default,
        checkpoint_sha256=row.file_sha256,
        arch=dict(row.arch),
        created_at=_iso(row.created_at) or "",
    )


def training_out(run: TrainingRun, model_name: str | None) -> TrainingOut:
    return TrainingOut(
        id=run.id,
        url=f"/admin/training/{run.id}",
        status=run.status,
        kind=run.kind,
        dataset=run.dataset,
        name=run.result_name,
        params=dict(run.params),
        progress=Progress(done=run.progress_done, total=run.progress_total),
        attempts=run.attempts,
        metrics=dict(run.metrics),
        model=model_name,
        created_at=_iso(run.created_at) or "",
        started_at=_iso(run.started_at),
        finished_at=_iso(run.finished_at),
        error=run.error,
    )


# ---------------------------------------------------------------------------------- evaluations


class EvaluationProgress(BaseModel):
    images_done: int = Field(description="Images with a certificate.")
    images_failed: int = Field(description="Images whose job failed.")
    images_cancelled: int = Field(description="Images whose job was cancelled (or the evaluation).")
    images_total: int
    samples_done: int = Field(description="Noisy samples evaluated so far, all images.")
    samples_total: int = Field(
        description="Samples the images draw in all: (n0 + n) each (decide: n is the cap)."
    )


class RadiusAccuracy(BaseModel):
    radius: float = Field(description="L2 radius r.")
    accuracy: float = Field(
        description="Fraction of the certified images with prediction == label and radius >= r "
        "(abstentions count as wrong)."
    )


class DecisionsOut(BaseModel):
    """decide evaluations: the share of each decision and the samples drawn."""

    certified: float
    not_certified: float
    undecided: float
    certified_accuracy: float = Field(
        description="Fraction decided 'certified' at target_radius with prediction == label."
    )
    n_used_median: float = Field(description="Median estimation samples drawn per image.")
    n_used_mean: float
    samples_saved: float = Field(
        description="All forward passes saved against fixed-n CERTIFY at n with its default "
        "n0 = 100: (100 + n) per image over samples_total (n0 + n_used) per image."
    )


class SkippedFile(BaseModel):
    """A member of the test set that was not certified (``skip_invalid``)."""

    name: str = Field(description="Its path in the set, e.g. 0/b.avif.")
    reason: str = Field(description="Why it is not a supported image.")


class EvaluationTime(BaseModel):
    compute_s: float = Field(description="Sum over the finished images of their jobs' run time.")
    wall_s: float = Field(description="From submission to the last image's end (or now).")


class EvaluationOut(BaseModel):
    """A test set certified through the service. Results cover the images with a certificate
    (``progress.images_done``); all numbers are at full precision."""

    id: str
    url: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"] = Field(
        description="queued (no image started), running, succeeded (every image has a "
        "certificate), failed (some job failed or was cancelled: see error), cancelled."
    )
    source: str = Field(description="digits:test, a server dataset folder, or archive:<name>.")
    archive_sha256: str | None = Field(description="sha256 of the uploaded archive.")
    mode: str
    model: str
    sigma: float
    alpha: float
    n0: int
    n: int
    target_radius: float | None = None
    time_budget_s: float | None = None
    skip: int
    max: int | None = Field(description="At most this many images (after skip); null: all.")
    progress: EvaluationProgress
    skipped: list[SkippedFile] = Field(
        default_factory=list,
        description="Files of the set that are not supported images, left out with their "
        "reasons (only with skip_invalid; without it such a file refuses the evaluation). "
        "progress.images_total counts the images certified, not these.",
    )
    certified_accuracy: list[RadiusAccuracy] | None = Field(
        description="certify modes: at r = 0, 0.25, 0.5, ... up to max_radius."
    )
    max_radius: float | None = Field(
        description="certify modes: the largest radius n and alpha can certify."
    )
    clean_accuracy: float | None = Field(
        description="Fraction with prediction == label (abstentions count as wrong)."
    )
    abstention_rate: float | None
    average_certified_radius: float | None = Field(
        description="certify modes: mean of the radius of correct predictions, 0 for the "
        "others (ACR, Zhai et al. 2020)."
    )
    decisions: DecisionsOut | None = Field(description="decide mode: the decisions summary.")
    time: EvaluationTime
    results_url: str = Field(description="The per-image TSV (Cohen et al.'s columns first).")
    plot_url: str = Field(description="PNG of certified accuracy against radius.")
    created_at: str
    finished_at: str | None
    cancelled_at: str | None
    error: str | None


class EvaluationPage(BaseModel):
    items: list[EvaluationOut]
    total: int
    limit: int
    offset: int
