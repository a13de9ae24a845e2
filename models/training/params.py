"""Hyper-parameters a service client may set for a training run, checked before it is queued.

The HTTP layer calls :func:`check_params` on a run's ``params``; the execution layer builds the
pipeline's config from the same dataclasses (:func:`config_class`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# Config fields a client may not set: the service decides where and how a run executes
# (num_workers stays 0: a Celery prefork child is daemonic and may not start loader processes).
RESERVED = frozenset(
    {
        "num_workers",
        "data",
        "out",
        "pretrained",
        "sigma",
        "init",
        "resume",
        "export",
        "command",
        "progress",
        "name",
        "device",
    }
)


def config_class(kind: str) -> Any:
    if kind == "pretrain":
        from models.training.pretrain import PretrainConfig

        return PretrainConfig
    from models.training.finetune import FinetuneConfig

    return FinetuneConfig


AT_LEAST_ONE = frozenset({"epochs", "batch_size", "accum_iter", "copies", "eval_batch"})


def check_params(kind: str, params: dict[str, Any]) -> None:
    """ValueError naming any hyper-parameter the training pipeline does not know, or a value
    of the wrong type, not finite, negative, or zero where a count must be positive."""
    types = {f.name: str(f.type) for f in dataclasses.fields(config_class(kind))}
    fields = set(types) - RESERVED
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(
            f"unknown {kind} parameter(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(fields))}"
        )
    for name, value in params.items():
        kind_of = types[name]
        if "tuple" in kind_of:  # mean/std: "0.5,0.5,0.5"
            parts = str(value).split(",")
            try:
                numbers = [float(v) for v in parts]
            except ValueError:
                raise ValueError(f"{name} must be comma-separated numbers, got {value!r}") from None
            if len(numbers) != 3 or not all(math.isfinite(v) for v in numbers):
                raise ValueError(f"{name} must be 3 finite numbers, got {value!r}")
            continue
        if kind_of.startswith("bool"):
            ok = isinstance(value, bool)
        elif kind_of.startswith("int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind_of.startswith("float"):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ValueError(f"{name} must be of type {kind_of}, got {value!r}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
            if name in AT_LEAST_ONE and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value!r}")
