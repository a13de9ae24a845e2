"""Training hyper-parameters given as a mapping (e.g. the admin API's ``params``), validated.

:func:`check_training_params` accepts exactly what ``dmae-certify train pretrain|finetune``
accepts, as config field names (``batch_size``, ``loss_on``, ...), and raises ValueError with
one sentence naming the parameter and what is wrong; :func:`config_values` turns the mapping
into config keyword arguments.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.training.finetune import FinetuneConfig
    from models.training.pretrain import PretrainConfig

KINDS = ("pretrain", "finetune")
# Decided by the service, never by a client: where and how a run executes (device, CPU
# threads, loader processes), its data (a client path would reach outside the dataset
# folder), its starting point and its noise level (the last three are separate fields of a
# request).
SERVICE_DECIDED = frozenset(
    {"num_workers", "threads", "data", "val_data", "out", "pretrained", "sigma", "init",
     "resume", "export", "command", "progress", "name", "device"}
)  # fmt: skip
AT_LEAST_ONE = frozenset(
    {"epochs", "batch_size", "accum_iter", "copies", "eval_batch", "eval_n", "input_size",
     "num_heads", "img_size", "patch_size", "embed_dim", "depth"}
)  # fmt: skip


def config_class(kind: str) -> type[PretrainConfig] | type[FinetuneConfig]:
    """``PretrainConfig`` or ``FinetuneConfig``; ValueError for another kind."""
    if kind == "pretrain":
        from models.training.pretrain import PretrainConfig

        return PretrainConfig
    if kind == "finetune":
        from models.training.finetune import FinetuneConfig

        return FinetuneConfig
    raise ValueError(f"training kind must be one of {', '.join(KINDS)}, got {kind!r}")


def accepted(kind: str) -> list[str]:
    """The parameter names a client may set for ``kind``."""
    return sorted(set(_field_types(kind)) - SERVICE_DECIDED)


def config_values(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` as config keyword arguments: type-checked, ``mean``/``std`` as tuples.

    Raises ValueError for an unknown or service-decided name, or a value of the wrong type.
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"training parameters must be a mapping of names to values: {params!r}")
    types_ = _field_types(kind)
    names = accepted(kind)
    wrong = sorted(str(k) for k in params if k not in names)
    if wrong:
        raise ValueError(
            f"unknown {kind} parameter(s) {', '.join(wrong)}; accepted: {', '.join(names)}"
        )
    return {name: _convert(name, value, types_[name]) for name, value in params.items()}


def check_training_params(
    kind: str,
    params: Mapping[str, Any],
    *,
    sigma: float | None = None,
    init: str | None = None,
) -> None:
    """Raise ValueError (one sentence) unless a ``kind`` run with these settings can start.

    ``params``: config field names to values (numbers, booleans, strings; ``mean``/``std`` as
    ``"R,G,B"`` or three numbers). ``sigma``: the training noise level (pre-training: >= 0, 0
    being MAE; fine-tuning: > 0, required). ``init`` (fine-tuning, required): the model to
    start from, or ``"none"`` for a random encoder of the preset ``params["arch"]``, shaped
    by ``img_size``, ``patch_size``, ``embed_dim``, ``depth`` and ``num_heads`` if given.
    Checks types, ranges and combinations (e.g. ``loss_on='masked'`` needs ``mask_ratio`` > 0,
    ``arch`` and the shape need ``init='none'``, ``patch_size`` must divide ``img_size``);
    whether ``init`` exists is the caller's to check.
    """
    values = config_values(kind, params)
    cls = config_class(kind)
    fixed: dict[str, Any] = {"data": "digits:train", "out": Path("unused")}
    if sigma is not None:
        if isinstance(sigma, bool) or not isinstance(sigma, int | float):
            raise ValueError(f"sigma must be a number, got {sigma!r}")
        fixed["sigma"] = float(sigma)
    if kind == "finetune":
        if sigma is None:
            raise ValueError("fine-tuning needs sigma, the noise level it trains for")
        if not init:
            raise ValueError(
                "fine-tuning needs init: a registered model to start from, or 'none' to train "
                "from a randomly initialised encoder"
            )
        fixed["pretrained"] = str(init)
    try:
        cls(**fixed, **values).check()
    except ValueError as exc:
        raise ValueError(_as_param_names(str(exc))) from None


def _field_types(kind: str) -> dict[str, Any]:
    cls = config_class(kind)
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(name: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` of config field ``name`` (None allowed if optional)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} may not be null")
    if typing.get_origin(base) is tuple:
        return _triple(name, value)
    if base is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if base in (int, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or (base is int and not float(value).is_integer()):
            what = "a whole number" if base is int else "a number"
            raise ValueError(f"{name} must be {what}, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        if name in AT_LEAST_ONE and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value!r}")
        return int(value) if base is int else float(value)
    if base is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    raise ValueError(f"{name} cannot be set here")  # e.g. paths


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    parts = value.split(",") if isinstance(value, str) else value
    try:
        numbers = [float(v) for v in parts if not isinstance(v, bool)]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != 3 or len(list(parts)) != 3 or not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"{name} must be 3 finite numbers (R,G,B), got {value!r}")
    return (numbers[0], numbers[1], numbers[2])


def _as_param_names(message: str) -> str:
    """A config check's message in parameter names: ``--layer-decay`` -> ``layer_decay``."""
    message = message.replace("--pretrained none", "init 'none'")
    return re.sub(r"--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), message)
