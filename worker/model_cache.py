"""Models loaded once per process: a small LRU keyed by registry id and file hash.

Loading happens lazily in the process that runs jobs (the Celery child, or the API process in
embedded mode), never in a forking parent, so CUDA is only initialised where it is used. The
file's sha256 is checked against the registry: a certificate always names the exact weights.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from torch import nn

from domain import metrics
from domain.registry import location_path
from domain.store.tables import Checkpoint
from worker.engine import unregister_everywhere


@dataclass(frozen=True)
class ModelRef:
    """What a job needs to know about its registered checkpoint (detached from the session)."""

    id: int
    name: str
    location: str
    file_sha256: str
    import_options: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, row: Checkpoint) -> ModelRef:
        opts = tuple(
            sorted(
                (k, tuple(v) if isinstance(v, list) else v) for k, v in row.import_options.items()
            )
        )
        return cls(row.id, row.name, row.location, row.file_sha256, opts)


@dataclass
class LoadedModel:
    ref: ModelRef
    model: nn.Module
    meta: Any  # models.checkpoints.CheckpointMeta
    device: str
    load_s: float

    @property
    def engine_key(self) -> str:
        """The batching engine's name for this loaded copy: registry id, file hash, instance."""
        return f"{self.ref.id}:{self.ref.file_sha256[:16]}:{id(self.model):x}"


class ModelCache:
    """Thread-safe LRU of loaded classifiers; one load per (model, file hash, device)."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._models: OrderedDict[tuple[int, str, str], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[int, str, str], threading.Lock] = {}

    def get(self, ref: ModelRef, device: str) -> LoadedModel:
        key = (ref.id, ref.file_sha256, device)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            load_lock = self._loading.setdefault(key, threading.Lock())
        with load_lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            loaded = load(ref, device)
            with self._lock:
                self._models[key] = loaded
                while len(self._models) > self.capacity:
                    _, evicted = self._models.popitem(last=False)
                    unregister_everywhere(evicted.engine_key)
                self._loading.pop(key, None)
            return loaded

    def clear(self) -> None:
        with self._lock:
            for loaded in self._models.values():
                unregister_everywhere(loaded.engine_key)
            self._models.clear()


def load(ref: ModelRef, device: str) -> LoadedModel:
    """Read, verify and move one classifier to ``device``; CheckpointError with the reason."""
    import time

    from models.checkpoints import CheckpointError, file_sha256, load_classifier_with_meta

    started = time.perf_counter()
    path = location_path(ref.location)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file of model {ref.name!r} is missing ({path})")
    actual = file_sha256(path)
    if actual != ref.file_sha256:
        raise CheckpointError(
            f"checkpoint file of model {ref.name!r} changed since it was registered "
            f"(sha256 {actual[:12]}..., registered {ref.file_sha256[:12]}...)"
        )
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in ref.import_options}
    model, meta = load_classifier_with_meta(path, **options)
    model = model.to(device).eval()
    seconds = time.perf_counter() - started
    metrics.MODEL_LOAD_SECONDS.observe(seconds)
    return LoadedModel(ref, model, meta, device, seconds)


CACHE = ModelCache()
