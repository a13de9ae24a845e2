"""Admin routes (admin key): the model registry and training runs."""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from sqlalchemy import func, select

from app.auth import Admin, SessionDep
from app.errors import error_responses
from app.routes.deps import MAX_OFFSET, DispatcherDep, SessionEndingRoute, SettingsDep
from app.schemas import ModelOut, TrainingIn, TrainingOut, TrainingPage, model_out, training_out
from app.upload_files import save_upload
from domain import registry
from domain.config import Settings
from domain.errors import ServiceError, bad_input, hide_folders, not_found
from domain.store import state
from domain.store.tables import Checkpoint, Status, TrainingRun

router = APIRouter(
    route_class=SessionEndingRoute,
    prefix="/admin",
    tags=["admin"],
    responses=error_responses(401, 403, 429, 503),
)
NO_SUCH_RUN = {404: "No such training run."}


def _floats(text: str | None, what: str, positive: bool = False) -> list[float] | None:
    """Three comma-separated finite numbers (positive ones for ``positive``), or None."""
    if text is None or text == "":
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise bad_input(f"{what} must be comma-separated numbers, got {text!r}") from exc
    if len(values) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in values):
        kind = "positive" if positive else "finite"
        raise bad_input(f"{what} must be 3 {kind} numbers (one per RGB channel), got {text!r}")
    return values


@router.get(
    "/models",
    response_model=list[ModelOut],
    summary="Every registered model, active or not",
)
def all_models(admin: Admin, session: SessionDep) -> list[ModelOut]:
    del admin
    return [model_out(r) for r in session.scalars(select(Checkpoint).order_by(Checkpoint.id))]


@router.post(
    "/models",
    status_code=201,
    response_model=ModelOut,
    responses=error_responses(
        400,
        409,
        413,
        422,
        why={
            409: "Name taken.",
            413: "Upload larger than DMAE_MAX_CHECKPOINT_BYTES.",
            422: "Not a loadable checkpoint, a path outside the checkpoint folder, or an "
            "invalid option.",
        },
    ),
    summary="Register a checkpoint (upload, or a path in the server's checkpoint folder)",
)
def register_model(
    admin: Admin,
    session: SessionDep,
    settings: SettingsDep,
    file: Annotated[UploadFile | None, File(description="Checkpoint file to upload.")] = None,
    path: Annotated[
        str | None,
        Form(
            description="Instead of an upload: a file inside DMAE_CHECKPOINT_DIR (relative).",
            examples=["imagenet/dmae_vitb_finetuned_s0.25.pth"],
        ),
    ] = None,
    name: Annotated[str | None, Form(description="Registry name (default: from the file).")] = None,
    active: Annotated[
        bool, Form(description="Serve requests right away (requests that name it).")
    ] = True,
    default: Annotated[
        bool,
        Form(
            description="Also make it the default model of its sigma: requests with that "
            "sigma and no model then run on it (needs active and a sigma)."
        ),
    ] = False,
    sigma: Annotated[float | None, Form(description="Official files: training sigma.")] = None,
    input_size: Annotated[
        int | None, Form(description="Official files: native input size.")
    ] = None,
    classes: Annotated[
        str | None, Form(description="Official files: comma-separated class names.")
    ] = None,
    mean: Annotated[
        str | None, Form(description="Official files: 3 comma-separated means.")
    ] = None,
    std: Annotated[str | None, Form(description="Official files: 3 comma-separated stds.")] = None,
    num_heads: Annotated[int | None, Form(description="Official files: attention heads.")] = None,
    licence: Annotated[str | None, Form(description="Licence note shown to clients.")] = None,
) -> ModelOut:
    """Project checkpoints (.safetensors with metadata) and official DMAE files (read with
    ``weights_only``; pickled code is refused) are accepted. Official files need the options the
    format does not store (sigma, input size, class names, mean/std). A new model serves only
    requests that name it, unless ``default`` makes it its sigma's default model."""
    if (file is None) == (path is None or path == ""):
        raise bad_input("give exactly one of: file (an upload) or path (on the server)")
    options = {
        "sigma": sigma,
        "input_size": input_size,
        "num_heads": num_heads,
        "classes": [c.strip() for c in classes.split(",")] if classes else None,
        "mean": _floats(mean, "mean"),
        "std": _floats(std, "std", positive=True),
    }
    if sigma is not None and not (math.isfinite(sigma) and sigma > 0):
        raise bad_input(f"sigma must be a positive finite number, got {sigma}")
    for what, count in (("input_size", input_size), ("num_heads", num_heads)):
        if count is not None and not 1 <= count <= 100_000:
            raise bad_input(f"{what} must be a positive integer, got {count}")
    if name is not None:
        registry.check_name(name)
    if file is not None:
        saved, _ = save_upload(file, settings.uploads / "uploaded", settings.max_checkpoint_bytes)
        try:
            row = registry.register(
                session,
                location=str(saved),
                name=name or _stem(file.filename),
                options=options,
                active=active,
                default=default,
                created_by=admin.id,
                licence=licence,
                shown=f"the upload {file.filename or 'file'!r}",
            )
        except Exception:
            if (
                session.scalar(select(Checkpoint.id).where(Checkpoint.location == str(saved)))
                is None
            ):
                saved.unlink(missing_ok=True)
            raise
        session.commit()
    else:
        assert path is not None
        target = registry.inside(settings.checkpoints, path, "checkpoint")
        if not target.is_file():
            raise bad_input(f"no checkpoint file {path!r} in the server's checkpoint folder")
        row = registry.register(
            session,
            location=str(target),
            name=name,
            options=options,
            active=active,
            default=default,
            created_by=admin.id,
            licence=licence,
            shown=repr(path),
        )
        session.commit()
    return model_out(row)


def _stem(filename: str | None) -> str | None:
    """A registry name from an uploaded file's name, only if it is already a valid one."""
    if not filename:
        return None
    stem = filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1].rsplit(".", 1)[0]
    return stem if registry.NAME_RE.match(stem) else None


def _set_active(session: SessionDep, name: str, active: bool) -> ModelOut:
    row = registry.set_active(session, name, active)
    session.commit()
    return model_out(row)


@router.post(
    "/models/{name}/activate",
    response_model=ModelOut,
    responses=error_responses(404, why={404: "No such model."}),
    summary="Serve requests with this model",
)
def activate(name: str, admin: Admin, session: SessionDep) -> ModelOut:
    del admin
    return _set_active(session, name, True)


@router.post(
    "/models/{name}/deactivate",
    response_model=ModelOut,
    responses=error_responses(404, why={404: "No such model."}),
    summary="Stop serving new requests with this model",
)
def deactivate(name: str, admin: Admin, session: SessionDep) -> ModelOut:
    """Queued jobs already bound to the model still run; new requests cannot pick it."""
    del admin
    return _set_active(session, name, False)


@router.post(
    "/models/{name}/default",
    response_model=ModelOut,
    responses=error_responses(
        404,
        422,
        why={404: "No such model.", 422: "Not an active classifier with a training sigma."},
    ),
    summary="Make this model the default of its sigma",
)
def make_default(name: str, admin: Admin, session: SessionDep) -> ModelOut:
    """Requests with the model's sigma and no model name run on it from now on (the previous
    default of that sigma stops being one; it stays active for requests that name it)."""
    del admin
    row = registry.set_default(session, name)
    session.commit()
    return model_out(row)


# ---------------------------------------------------------------- training runs


def _training(session: SessionDep, settings: Settings, run: TrainingRun) -> TrainingOut:
    """A run as the API shows it: its dataset, parameters, log and error name the server's
    folders by what they are (``<dataset folder>/cats``), never by their path."""
    name = None
    if run.checkpoint_id is not None:
        name = session.scalar(select(Checkpoint.name).where(Checkpoint.id == run.checkpoint_id))
    shown = training_out(run, name).model_dump_json()
    return TrainingOut.model_validate_json(hide_folders(shown, settings.private_folders()))


def _dataset(settings: Any, spec: str) -> str:
    """A training dataset: a built-in one, or a folder inside the server's dataset folder."""
    return registry.dataset(settings.datasets, spec)


@router.post(
    "/training",
    status_code=202,
    response_model=TrainingOut,
    responses=error_responses(
        400,
        409,
        413,
        422,
        why={
            409: "Result name taken.",
            413: "Request body larger than 1 MiB.",
            422: "Unknown dataset, model or hyper-parameter.",
        },
    ),
    summary="Launch a pre-training or fine-tuning run on the workers",
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {
                    # Runs as it is on the embedded default (nothing to register first): a
                    # fine-tuning from a random encoder of the tiny preset, two epochs.
                    "example": {
                        "kind": "finetune",
                        "dataset": "digits:train",
                        "name": "digits-scratch-s0.50",
                        "sigma": 0.5,
                        "init": "none",
                        "params": {
                            "arch": "tiny",
                            "epochs": 2,
                            "warmup_epochs": 1,
                            "batch_size": 64,
                            "blr": 5e-4,
                        },
                    }
                }
            }
        }
    },
)
def launch_training(
    body: TrainingIn,
    admin: Admin,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
) -> TrainingOut:
    """The run reports progress (optimiser steps) on GET /admin/training/{id} and registers the
    resulting checkpoint under ``name`` when it finishes."""
    from models.training.params import check_training_params

    registry.check_name(body.name)
    if session.scalar(select(Checkpoint.id).where(Checkpoint.name == body.name)) is not None:
        raise ServiceError(409, f"a model named {body.name!r} is already registered")
    dataset = _dataset(settings, body.dataset)
    params: dict[str, Any] = dict(body.params)
    val_data = params.pop("val_data", None)  # a dataset like `dataset`, resolved the same way
    if body.default and not body.activate:
        raise bad_input("default needs activate: a deactivated model cannot be a default")
    if body.default and body.kind != "finetune":
        raise bad_input("default is for fine-tuning runs: a pre-trained model serves no requests")
    if body.init is not None and body.init != "none":
        init = session.scalar(select(Checkpoint).where(Checkpoint.name == body.init))
        if init is None:
            raise bad_input(f"unknown model {body.init!r} for init")
    try:
        check_training_params(body.kind, params, sigma=body.sigma, init=body.init)
    except ValueError as exc:
        raise bad_input(str(exc)) from exc
    if isinstance(val_data, str):
        params["val_data"] = _dataset(settings, val_data)
    elif val_data is not None:
        raise bad_input(f"val_data must be a dataset name like dataset, got {val_data!r}")
    params["sigma"] = body.sigma
    if body.init:
        params["init"] = body.init
    run = TrainingRun(
        owner_id=admin.id,
        kind=body.kind,
        dataset=dataset,
        params=params,
        result_name=body.name,
        activate=body.activate,
        make_default=body.default,
        status=Status.QUEUED.value,
        progress_done=0,
        progress_total=0,
        attempts=0,
        metrics={},
    )
    session.add(run)
    session.commit()
    dispatcher.train(run.id)
    state.mark_enqueued(session, TrainingRun, run.id)
    session.refresh(run)
    return _training(session, settings, run)


@router.get(
    "/training",
    response_model=TrainingPage,
    responses=error_responses(422),
    summary="Training runs, newest first",
)
def list_training(
    admin: Admin,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> TrainingPage:
    del admin
    limit = min(limit, settings.jobs_page_max)
    total = session.scalar(select(func.count()).select_from(TrainingRun)) or 0
    runs = session.scalars(
        select(TrainingRun).order_by(TrainingRun.created_at.desc()).limit(limit).offset(offset)
    ).all()
    return TrainingPage(
        items=[_training(session, settings, r) for r in runs],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get(
    "/training/{run_id}",
    response_model=TrainingOut,
    responses=error_responses(404, why=NO_SUCH_RUN),
)
def get_training(
    run_id: str, admin: Admin, session: SessionDep, settings: SettingsDep
) -> TrainingOut:
    del admin
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise not_found(f"training run {run_id!r}")
    return _training(session, settings, run)


@router.delete(
    "/training/{run_id}",
    response_model=TrainingOut,
    responses=error_responses(404, 409, why={**NO_SUCH_RUN, 409: "The run already finished."}),
    summary="Cancel a queued or running training run",
)
def cancel_training(
    run_id: str, admin: Admin, session: SessionDep, settings: SettingsDep
) -> TrainingOut:
    del admin
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise not_found(f"training run {run_id!r}")
    if not state.cancel(session, TrainingRun, run_id):
        session.refresh(run)
        raise ServiceError(409, f"training run already {run.status}; nothing to cancel")
    session.refresh(run)
    return _training(session, settings, run)
