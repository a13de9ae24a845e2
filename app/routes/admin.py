"""Admin routes (admin key): the model registry and training runs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth import Admin, SessionDep
from app.errors import error_responses
from app.routes.deps import MAX_OFFSET, DispatcherDep, SessionEndingRoute, SettingsDep
from app.schemas import ModelOut, TrainingIn, TrainingOut, TrainingPage, model_out, training_out
from app.upload_files import save_upload
from domain import registry
from domain.config import Settings
from domain.errors import ServiceError, bad_input, hide_folders, not_found
from domain.services import checkpoints, dispatching
from domain.store import state
from domain.store.tables import Checkpoint, TrainingRun

router = APIRouter(
    route_class=SessionEndingRoute,
    prefix="/admin",
    tags=["admin"],
    responses=error_responses(401, 403, 429, 503),
)
NO_SUCH_RUN = {404: "No such training run."}


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
    options = checkpoints.official_options(
        sigma=sigma, input_size=input_size, num_heads=num_heads, classes=classes, mean=mean,
        std=std,
    )  # fmt: skip
    if name is not None:
        registry.check_name(name)
    how = checkpoints.Registration(name, active, default, licence, created_by=admin.id)
    if file is not None:
        saved, _ = save_upload(file, settings.uploads / "uploaded", settings.max_checkpoint_bytes)
        row = checkpoints.register_upload(session, saved, file.filename, options, how)
    else:
        assert path is not None
        row = checkpoints.register_path(session, settings.checkpoints, path, options, how)
    return model_out(row)


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


def _training(session: Session, settings: Settings, run: TrainingRun) -> TrainingOut:
    """A run as the API shows it: its dataset, parameters, log and error name the server's
    folders by what they are (``<dataset folder>/cats``), never by their path."""
    name = None
    if run.checkpoint_id is not None:
        name = session.scalar(select(Checkpoint.name).where(Checkpoint.id == run.checkpoint_id))
    shown = training_out(run, name).model_dump_json()
    return TrainingOut.model_validate_json(hide_folders(shown, settings.private_folders()))


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
    request = dispatching.Training(**body.model_dump())
    run = dispatching.launch_training(session, admin, request, settings, dispatcher)
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
