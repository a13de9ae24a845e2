"""Training runs on the workers: pre-training or fine-tuning through ``models.training``, with
progress and heartbeat on the run's row, cancellation, resume after a lost worker, and the
resulting checkpoint registered in the model registry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import update

from domain.config import Settings, get_settings
from domain.store import state
from domain.store.db import Database, get_database
from domain.store.tables import Checkpoint, Status, TrainingRun
from worker.monitor import Aborted, Monitor

log = logging.getLogger("dmae.training")

LOG_TAIL = 30


def build_config(run: TrainingRun, init_path: str | None, out: Path, device: str) -> Any:
    """The pipeline's config for ``run``, resuming from ``out`` when a lost attempt left state."""
    from models.training.params import config_class, config_values
    from models.training.state import STATE_FILE

    params = dict(run.params)
    sigma = float(params.pop("sigma", 0.25))
    init = params.pop("init", None)
    val_data = params.pop("val_data", None)  # resolved inside the dataset folder on submission
    values = config_values(run.kind, params)
    if val_data is not None:
        values["val_data"] = val_data
    common: dict[str, Any] = dict(
        data=run.dataset,
        out=out,
        sigma=sigma,
        resume=(out / STATE_FILE).exists(),
        progress=False,
        name=run.result_name,
        device=device,
        command=f"service training run {run.id}",
        num_workers=0,
    )
    if run.kind == "finetune":
        if init == "none":
            common["pretrained"] = "none"  # a randomly initialised encoder (a baseline)
        elif init_path is None:
            raise ValueError("fine-tuning needs a pre-trained model (init) or init 'none'")
        else:
            common["pretrained"] = init_path
    return config_class(run.kind)(**common, **values)


def _configure(db: Database, run_id: str, out: Path, device: str) -> tuple[str, Any]:
    """The run's kind and pipeline config (``init`` resolved to its checkpoint's file).
    Raises whatever makes the run's configuration invalid."""
    from domain import registry

    with db.session() as s:
        run = s.get(TrainingRun, run_id)
        assert run is not None
        init = run.params.get("init")
        init_path = None
        if init and init != "none":
            row = registry.get_model(s, str(init))
            init_path = str(registry.location_path(row.location))
        return run.kind, build_config(run, init_path, out, device)


def _train(kind: str, cfg: Any, mon: Monitor, lines: list[str], run_id: str) -> str | Path:
    """Run the pipeline under ``mon`` (steps as progress, the last ``LOG_TAIL`` log lines in
    ``lines`` and the run's metrics); returns the checkpoint's path. Raises ``Aborted``
    (cancelled, lost, shutting down) and the pipeline's errors."""

    def after_step(step: int) -> None:
        mon.done = step
        mon.check()

    def log_line(msg: str) -> None:
        lines.append(str(msg))
        del lines[:-LOG_TAIL]
        mon.values = {"metrics": {"log": list(lines)}}  # the live log tail, each heartbeat
        log.info("training %s: %s", run_id[:8], msg)

    if kind == "pretrain":
        from models.training.pretrain import run_pretrain

        return run_pretrain(cfg, log=log_line, after_step=after_step)
    from models.training.finetune import run_finetune

    return run_finetune(cfg, log=log_line, after_step=after_step)


def _register(
    db: Database, run_id: str, token: str, path: str | Path, metrics: dict[str, Any], steps: int
) -> str:
    """Finish the run as succeeded and register its checkpoint, in one commit; the run fails
    if the registration is refused. Returns the run's outcome."""
    from domain import registry

    with db.session() as s:
        run = s.get(TrainingRun, run_id)
        assert run is not None
        if not state.finish(
            s,
            TrainingRun,
            run_id,
            token,
            Status.SUCCEEDED,
            metrics=metrics,
            progress_done=steps,
            progress_total=steps,
        ):
            s.rollback()
            return "aborted"
        try:  # the finish, the registration and the link commit together
            ckpt: Checkpoint = registry.register(
                s,
                location=str(Path(path).resolve()),
                name=run.result_name,
                active=run.activate,
                default=run.make_default,
                created_by=run.owner_id,
            )
        except Exception as exc:
            s.rollback()
            detail = getattr(exc, "detail", str(exc))
            lines = metrics["log"]
            return _fail(db, run_id, token, f"trained, but not registered: {detail}", lines)
        s.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(checkpoint_id=ckpt.id))
        s.commit()
    return Status.SUCCEEDED.value


def run_training(
    run_id: str,
    settings: Settings | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> str:
    """Run training run ``run_id`` if it can be claimed; registers its checkpoint on success.
    Returns the outcome: a claim's refusal, "succeeded", "failed", "aborted" or "released"."""
    settings = settings or get_settings()
    db = get_database(settings.database_url)
    token, outcome = state.claim_with_new_token(db, TrainingRun, run_id, settings)
    if outcome is not state.Claim.CLAIMED:
        return outcome.value

    out = (settings.uploads / "training" / run_id).resolve()
    lines: list[str] = []
    try:
        kind, cfg = _configure(db, run_id, out, settings.torch_device())
    except Exception as exc:  # a bad configuration is the run's failure, not the worker's
        return _fail(db, run_id, token, f"invalid training run: {exc}")

    with Monitor(db, TrainingRun, run_id, token, settings.heartbeat_s, should_stop) as mon:
        started = time.perf_counter()
        try:
            path = _train(kind, cfg, mon, lines, run_id)
        except Aborted as exc:
            if exc.reason == "shutdown":
                with db.session() as s:
                    state.release(s, TrainingRun, run_id, token)
                return "released"
            return "aborted"
        except Exception as exc:  # the pipeline's errors are the run's
            log.exception("training run %s failed", run_id)
            return _fail(db, run_id, token, f"{type(exc).__name__}: {exc}", lines)

    metrics = {"seconds": time.perf_counter() - started, "steps": mon.done, "log": lines}
    return _register(db, run_id, token, path, metrics, mon.done)


def _fail(db: Database, run_id: str, token: str, error: str, lines: list[str] | None = None) -> str:
    with db.session() as s:
        ok = state.finish(
            s,
            TrainingRun,
            run_id,
            token,
            Status.FAILED,
            error=error[:4000],
            metrics={"log": lines or []},
        )
        s.commit()
    log.warning("training run %s failed: %s", run_id, error)
    return Status.FAILED.value if ok else "aborted"
