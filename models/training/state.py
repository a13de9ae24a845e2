"""Resumable run state: one ``torch.save`` file of tensors and plain containers.

It holds the model, optimiser, schedule and grad-scaler states, the epoch and step, the number
of processes, and every random state the run draws from (torch CPU and CUDA, NumPy, Python, and
the run's own noise generator; per process under torchrun); the data order is a function of
(seed, epoch) and the position in the epoch. The
file is written atomically (temporary file + rename), so a run killed while saving keeps its
previous state, and it is read back with ``weights_only=True``: nothing is unpickled beyond
tensors, numbers, strings and containers.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FORMAT = "dmae-certify-train-state/1"
STATE_FILE = "state.pt"
# torch.cuda.is_initialized, typed (torch leaves it unannotated)
_cuda_initialized: Callable[[], bool] = torch.cuda.is_initialized


def capture_rng(noise: torch.Generator, device: torch.device | None = None) -> dict[str, Any]:
    """Every random state the training loop draws from, as tensors and plain values.

    On CUDA only the run's own device's generator is read (``cuda`` is a one-element list),
    so a process never touches another process's GPU.
    """
    _, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    cuda = []
    if device is not None and device.type == "cuda" and _cuda_initialized():
        cuda = [torch.cuda.get_rng_state(device)]
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": {
            "key": torch.from_numpy(np.asarray(key).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "noise": noise.get_state(),
    }


def restore_rng(
    state: dict[str, Any], noise: torch.Generator, device: torch.device | None = None
) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and device is not None and device.type == "cuda":
        # one state (this format) or, from older files, one per visible GPU
        index = 0 if len(cuda) == 1 else (device.index or 0)
        torch.cuda.set_rng_state(cuda[index], device)
    npd = state["numpy"]
    key = npd["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, npd["pos"], npd["has_gauss"], npd["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    noise.set_state(state["noise"])


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (a kill mid-write leaves the previous file intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": STATE_FORMAT, **state}, tmp)
    os.replace(tmp, path)


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a state written by :func:`save_state` (tensors and plain containers only)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # unpickling refusal, truncated zip, ...
        raise ValueError(f"{path}: not a readable training state ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a {STATE_FORMAT} file")
    return state


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that differ between a saved run and the one asked to resume it."""
    keys = sorted(set(saved) | set(current))
    return [
        f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}"
        for k in keys
        if saved.get(k) != current.get(k)
    ]
