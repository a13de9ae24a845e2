"""The sampling engine: one thread owns the device and packs many jobs' noise into shared batches.

Jobs run the one certification core (:func:`models.smoothing.certify` / ``predict``) with a
sampler from :meth:`Engine.sampler`. Its ``counts()`` call, made from the job's own thread,
hands the request to the engine thread and blocks until the counts are ready. The engine
thread fills fixed-size batches for one model at a time with rows from every job waiting on
that model (max-min fair shares, :func:`worker.batching.fair_shares`), draws each job's rows
from the job's own :class:`~models.smoothing.NoiseStream` on the device in float32, runs the
model (bf16 autocast on CUDA, optionally ``torch.compile``-d), and accumulates class counts per
job on the device. A job's noise, and so its counts, do not depend on which jobs shared its
batches.

Progress: the sampler calls the core's ``progress`` callback from the job's thread with the
number of samples each finished batch contributed. Cancellation: set the ``cancel`` event
passed to :meth:`Engine.sampler` (``counts()`` then raises :class:`Cancelled`), or raise from the
progress callback (``counts()`` re-raises it); either way the job takes part in no batch
assembled after that point.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from domain import metrics
from models.smoothing import NoiseStream, ProgressFn
from worker.batching import fair_shares

log = logging.getLogger(__name__)

# CPU: activations of a few hundred rows stay in cache; at 1024 the tiny ViT ran ~20% slower.
CPU_BATCH = 256
PROBE_BATCH = 16  # rows of the forward pass that measures a model's activation memory per row
MEMORY_FRACTION = 0.6  # share of free device memory one model's batches may take
WAIT_POLL_S = 0.5  # how often a waiting job checks its cancel event and the engine thread


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Same device, counting ``cuda`` and ``cuda:<current>`` as one."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


_SHARED: dict[str, Engine] = {}
_SHARED_LOCK = threading.Lock()


def shared_engine(device: torch.device | str = "cpu", **options: Any) -> Engine:
    """The process's one engine for ``device``, created on first use with ``options``.

    Call it in the process that runs jobs (a Celery child, or the API process in embedded
    mode), never in a parent that forks afterwards: the engine's thread and CUDA state do not
    survive a fork.
    """
    name = str(torch.device(device))
    with _SHARED_LOCK:
        engine = _SHARED.get(name)
        if engine is None or engine.closed:
            engine = _SHARED[name] = Engine(device, **options)
        return engine


def unregister_everywhere(key: str) -> None:
    """Forget model ``key`` on every engine of this process (e.g. evicted from a model cache)."""
    with _SHARED_LOCK:
        engines = list(_SHARED.values())
    for engine in engines:
        engine.unregister(key)


class Cancelled(Exception):
    """The job was cancelled while its samples were being drawn."""


class EngineClosed(RuntimeError):
    """The engine was shut down (or its thread died) before the job's counts were ready."""


@dataclass(eq=False)
class _Model:
    """A registered model, its inference callable and the batch size chosen for it."""

    key: str
    module: nn.Module
    num_classes: int
    runner: Callable[[Tensor], Tensor] | None = None
    batch_size: int | None = None
    buffers: dict[tuple[int, ...], Tensor] = field(default_factory=dict)


@dataclass(eq=False)
class _Submission:
    """One ``counts()`` call: ``num`` samples of one job, tracked from request to result."""

    model: _Model
    x: Tensor
    sigma: float
    num: int
    noise: NoiseStream
    cancel: threading.Event | None
    outbox: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    assigned: int = 0  # rows handed to batches (possibly still in flight)
    done: int = 0  # rows whose predictions are counted
    total: Tensor | None = None  # class counts on the device
    withdrawn: bool = False  # the job stopped waiting (progress callback raised)
    finished: bool = False

    @property
    def group(self) -> tuple[str, tuple[int, ...]]:
        return self.model.key, tuple(self.x.shape)


@dataclass(eq=False)
class _Batch:
    """Rows of one forward pass: which submission owns how many consecutive rows."""

    model: _Model
    parts: list[tuple[_Submission, int]]
    used: int
    event: Any = None  # torch.cuda.Event marking the end of its work on CUDA
    results: dict[_Submission, Tensor] = field(default_factory=dict)  # host counts, CUDA


class EngineSampler:
    """The core's ``Sampler`` protocol, served by an :class:`Engine` (one per job)."""

    def __init__(self, engine: Engine, model: _Model, cancel: threading.Event | None):
        self.engine = engine
        self.model_key = model.key
        self.num_classes = model.num_classes
        self.device = engine.device
        self._model = model
        self._cancel = cancel

    def counts(
        self,
        x: Tensor,
        sigma: float,
        num: int,
        noise: NoiseStream,
        progress: ProgressFn | None = None,
    ) -> Tensor:
        """Class counts (int64, host) of ``num`` noisy copies ``x + sigma * noise.take(num)``."""
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError("x must be one image tensor of shape (channels, height, width)")
        if tuple(noise.shape) != tuple(x.shape):
            raise ValueError(f"noise shape {noise.shape} does not match input {tuple(x.shape)}")
        if not _same_device(noise.device, self.device):
            raise ValueError(f"noise is on {noise.device}, the engine samples on {self.device}")
        if int(num) != num or num < 0:
            raise ValueError(f"num must be a non-negative integer, got {num!r}")
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("job cancelled before sampling started")
        if num == 0:
            return torch.zeros(self.num_classes, dtype=torch.long)
        sub = _Submission(self._model, x.detach(), float(sigma), int(num), noise, self._cancel)
        self.engine._submit(sub)
        try:
            while True:
                try:
                    item = sub.outbox.get(timeout=WAIT_POLL_S)
                except queue.Empty:
                    self.engine._check_alive()
                    if self._cancel is not None and self._cancel.is_set():
                        raise Cancelled("job cancelled while sampling") from None
                    continue
                if isinstance(item, int):
                    if progress is not None:
                        progress(item)
                elif isinstance(item, BaseException):
                    raise item
                else:
                    return item.clone()  # a plain tensor, not an inference-mode one
        finally:
            sub.withdrawn = True  # no-op once finished; otherwise the engine drops it


class Engine:
    """Owns one device and the models registered on it; serves many jobs' ``counts()`` at once.

    ``autocast``: ``"auto"`` is bf16 on CUDA and full fp32 elsewhere (so CPU counts equal the
    plain :class:`~models.smoothing.BatchSampler`'s); ``None`` forces fp32; a dtype forces it.
    ``batch_size``: fixed rows per forward pass, or ``None`` to choose per model from the
    model and the free device memory, halving on out-of-memory. ``compile`` runs each model
    through ``torch.compile(mode=compile_mode)`` with every batch padded to the same size, so
    the compiled graph (or CUDA graph, with ``compile_mode="reduce-overhead"``) is reused.
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        batch_size: int | None = None,
        max_batch_size: int = 1024,
        autocast: torch.dtype | str | None = "auto",
        compile: bool = False,
        compile_mode: str | None = None,
        compile_backend: str = "inductor",
        pipeline_depth: int | None = None,
    ):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if batch_size is not None and batch_size < 1:
            raise ValueError("batch size must be at least 1")
        if max_batch_size < 1:
            raise ValueError("max batch size must be at least 1")
        if autocast == "auto":
            self.autocast: torch.dtype | None = (
                torch.bfloat16 if self.device.type == "cuda" else None
            )
        elif autocast is None or isinstance(autocast, torch.dtype):
            self.autocast = autocast
        else:
            raise ValueError(f"autocast must be 'auto', None or a torch dtype, got {autocast!r}")
        self.fixed_batch_size = batch_size
        self.max_batch_size = max_batch_size
        self.compile = compile
        self.compile_mode = compile_mode
        self.compile_backend = compile_backend
        # Batches launched ahead of the one being counted: on CUDA the host prepares batch t+1
        # while the device runs batch t; on CPU every operation is synchronous anyway.
        self.pipeline_depth = pipeline_depth or (2 if self.device.type == "cuda" else 1)
        self.stats = {"batches": 0, "rows": 0, "padded_rows": 0, "oom_backoffs": 0}

        self._models: dict[str, _Model] = {}
        self._groups: dict[tuple[str, tuple[int, ...]], list[_Submission]] = {}
        self._group_turn = itertools.count()
        self._row_turn = itertools.count()
        self._lock = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="dmae-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API

    def register(self, key: str, model: nn.Module, num_classes: int) -> None:
        """Put ``model`` (mapping (B, C, H, W) in [0,1] to logits) on the device under ``key``.

        Registering the same module under the same key again is a no-op, so job code may call
        this before every job; a different module under a taken key is an error.
        """
        if num_classes < 1:
            raise ValueError("num_classes must be at least 1")
        with self._lock:
            known = self._models.get(key)
            if known is not None:
                if known.module is model and known.num_classes == num_classes:
                    return
                raise ValueError(f"a different model is already registered under {key!r}")
            module = model.eval().requires_grad_(False).to(self.device)
            self._models[key] = _Model(key, module, num_classes)

    def unregister(self, key: str) -> None:
        """Forget model ``key`` (e.g. evicted from a cache); jobs waiting on it get an error."""
        with self._lock:
            if self._models.pop(key, None) is None:
                return
            for group in [g for g in self._groups if g[0] == key]:
                for sub in self._groups.pop(group):
                    sub.finished = True
                    sub.outbox.put(RuntimeError(f"model {key!r} was unloaded while sampling"))

    def load(self, key: str, path_or_name: str | Path, **official: Any) -> Any:
        """Load a classifier checkpoint (path or bundled name) and register it; returns its meta."""
        from models.checkpoints import load_classifier_with_meta

        model, meta = load_classifier_with_meta(path_or_name, **official)
        self.register(key, model, meta.num_classes)
        return meta

    def models(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def sampler(self, key: str, cancel: threading.Event | None = None) -> EngineSampler:
        """A ``Sampler`` for one job on model ``key``; setting ``cancel`` stops the job."""
        with self._lock:
            if key not in self._models:
                known = ", ".join(self._models) or "none"
                raise KeyError(f"no model registered under {key!r} (registered: {known})")
            return EngineSampler(self, self._models[key], cancel)

    def pending(self) -> int:
        """Number of ``counts()`` requests waiting for or being served by the engine."""
        with self._lock:
            return sum(len(subs) for subs in self._groups.values())

    @property
    def closed(self) -> bool:
        return self._closing or not self._thread.is_alive()

    def batch_size(self, key: str) -> int | None:
        """Rows per forward pass currently used for model ``key`` (None before its first batch)."""
        return self._models[key].batch_size

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the engine thread; jobs still waiting get :class:`EngineClosed`."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ job side

    def _submit(self, sub: _Submission) -> None:
        with self._lock:
            if self._closing or not self._thread.is_alive():
                raise EngineClosed("the sampling engine is shut down")
            self._groups.setdefault(sub.group, []).append(sub)
            self._lock.notify_all()

    def _check_alive(self) -> None:
        if not self._thread.is_alive():
            raise EngineClosed("the sampling engine thread has stopped")

    # ------------------------------------------------------------------ engine thread

    def _run(self) -> None:
        inflight: deque[_Batch] = deque()
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # events and streams of *this* device
            with torch.inference_mode():
                while True:
                    with self._lock:
                        while not self._closing and not inflight and not self._has_work():
                            self._lock.wait()
                        if self._closing:
                            break
                    batch = self._next_batch()
                    if batch is not None:
                        self._launch(batch)
                        inflight.append(batch)
                    while inflight and (batch is None or len(inflight) >= self.pipeline_depth):
                        self._finish(inflight.popleft())
        except BaseException as exc:  # never leave jobs waiting on a dead thread
            log.exception("sampling engine stopped")
            self._fail_all(EngineClosed(f"the sampling engine failed: {exc}"))
            return
        self._fail_all(EngineClosed("the sampling engine is shut down"))

    def _has_work(self) -> bool:
        return any(s.assigned < s.num for subs in self._groups.values() for s in subs)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            self._closing = True
            for subs in self._groups.values():
                for sub in subs:
                    sub.outbox.put(error)
            self._groups.clear()

    def _next_batch(self) -> _Batch | None:
        """Pick the next model group (round-robin) and split a batch among its jobs."""
        with self._lock:
            for key, subs in list(self._groups.items()):
                for sub in subs:
                    if sub.cancel is not None and sub.cancel.is_set() and not sub.withdrawn:
                        sub.outbox.put(Cancelled("job cancelled while sampling"))
                        sub.withdrawn = True
                    sub.finished = sub.finished or sub.withdrawn
                live = [s for s in subs if not s.finished]
                if live:
                    self._groups[key] = live
                else:
                    del self._groups[key]
            ready = [k for k, subs in self._groups.items() if any(s.assigned < s.num for s in subs)]
            if not ready:
                return None
            key = ready[next(self._group_turn) % len(ready)]
            subs = [s for s in self._groups[key] if s.assigned < s.num]
            model = subs[0].model
        try:
            capacity = model.batch_size or self._choose_batch_size(model, subs[0].x.shape)
        except Exception as exc:  # the probe forward failed: these jobs fail, the engine lives
            log.exception("choosing a batch size for model %s failed", model.key)
            self._fail_batch(_Batch(model, [(s, 0) for s in subs], 0), exc)
            return None
        shares = fair_shares([s.num - s.assigned for s in subs], capacity, next(self._row_turn))
        parts = [(s, k) for s, k in zip(subs, shares, strict=True) if k > 0]
        for sub, k in parts:
            sub.assigned += k
        return _Batch(model, parts, sum(k for _, k in parts))

    def _buffer(self, model: _Model, shape: tuple[int, ...], rows: int) -> Tensor:
        buf = model.buffers.get(shape)
        if buf is None or buf.shape[0] < rows:
            buf = torch.zeros((rows, *shape), device=self.device, dtype=torch.float32)
            model.buffers[shape] = buf
        return buf

    def _launch(self, batch: _Batch) -> None:
        """Fill the batch with each job's noisy rows, run the model, add up counts per job."""
        model = batch.model
        try:
            shape = tuple(batch.parts[0][0].x.shape)
            size = model.batch_size or batch.used
            rows = max(size, batch.used) if self.compile else batch.used
            buf = self._buffer(model, shape, rows)
            start = 0
            for sub, k in batch.parts:
                if sub.total is None:
                    # non_blocking: a blocking copy waits for every batch in flight, once per
                    # request (a sequential job makes one per chunk); from pageable memory the
                    # data is staged before the call returns, so the caller may reuse x.
                    sub.x = sub.x.to(self.device, torch.float32, non_blocking=True)
                    sub.total = torch.zeros(model.num_classes, dtype=torch.long, device=self.device)
                noise = sub.noise.take(k)  # the job's own stream: rows land where they belong
                torch.add(sub.x.unsqueeze(0), noise, alpha=sub.sigma, out=buf[start : start + k])
                start += k
            preds = self._predict(model, buf[:rows])[: batch.used]
            owner = torch.repeat_interleave(
                torch.arange(len(batch.parts)),
                torch.tensor([k for _, k in batch.parts]),
            ).to(self.device, non_blocking=True)
            hist = torch.zeros(
                len(batch.parts) * model.num_classes, dtype=torch.long, device=self.device
            )
            hist.index_add_(0, owner * model.num_classes + preds, torch.ones_like(preds))
            hist = hist.view(len(batch.parts), model.num_classes)
            for j, (sub, _) in enumerate(batch.parts):
                assert sub.total is not None
                sub.total += hist[j]
            if self.device.type == "cuda":
                self._stage_results(batch)  # before the event: ready when the event is
                batch.event = torch.cuda.Event()
                batch.event.record()
            self.stats["batches"] += 1
            self.stats["rows"] += batch.used
            self.stats["padded_rows"] += rows - batch.used
            metrics.BATCH_FILL.observe(batch.used / max(size, batch.used))
            if self.device.type == "cuda":
                memory = torch.cuda.memory_allocated(self.device)
                metrics.DEVICE_MEMORY.labels(device=str(self.device)).set(memory)
        except Exception as exc:
            log.exception("batch for model %s failed", model.key)
            self._fail_batch(batch, exc)

    def _stage_results(self, batch: _Batch) -> None:
        """Queue the host copy of the counts of every job whose last rows are in this batch.

        One non-blocking copy into pinned memory, ordered before the batch's event: the engine
        never waits on a device-to-host copy (``.cpu()`` would wait for every batch in flight,
        once per finished request, which many small sequential requests make frequent).
        """
        finishing = [sub for sub, _ in batch.parts if sub.assigned == sub.num]
        if not finishing:
            return
        totals = torch.stack([sub.total for sub in finishing if sub.total is not None])
        host = torch.empty(totals.shape, dtype=totals.dtype, pin_memory=True)
        host.copy_(totals, non_blocking=True)
        batch.results = dict(zip(finishing, host, strict=True))

    def _predict(self, model: _Model, rows: Tensor) -> Tensor:
        """Argmax class of every row, halving the model's batch size on out-of-memory."""
        if model.runner is None:
            model.runner = self._make_runner(model.module)
        while True:
            size = model.batch_size or rows.shape[0]
            try:
                return torch.cat([self._forward(model.runner, chunk) for chunk in rows.split(size)])
            except torch.OutOfMemoryError:
                if size <= 1:
                    raise
                model.batch_size = max(size // 2, 1)
                self.stats["oom_backoffs"] += 1
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning(
                    "out of memory at batch %d for %s; retrying at %d",
                    size,
                    model.key,
                    model.batch_size,
                )

    def _forward(self, runner: Callable[[Tensor], Tensor], batch: Tensor) -> Tensor:
        if self.compile and self.device.type == "cuda":
            # A new step for CUDA-graph trees ("reduce-overhead"): the previous outputs are
            # consumed (argmax) in stream order before the graph replays over them.
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(
            self.device.type,
            dtype=self.autocast or torch.bfloat16,
            enabled=self.autocast is not None,
        ):
            return runner(batch).argmax(dim=1)

    def _make_runner(self, module: nn.Module) -> Callable[[Tensor], Tensor]:
        if not self.compile:
            return module
        compiled: Callable[[Tensor], Tensor] = torch.compile(
            module, mode=self.compile_mode, backend=self.compile_backend, dynamic=False
        )
        return compiled

    def _choose_batch_size(self, model: _Model, shape: torch.Size | tuple[int, ...]) -> int:
        """Rows per forward pass: fixed if configured; else from the model's measured memory."""
        if self.fixed_batch_size is not None:
            size = self.fixed_batch_size
        elif self.device.type != "cuda":
            size = min(CPU_BATCH, self.max_batch_size)
        else:
            size = self._cuda_batch_size(model, tuple(shape))
        model.batch_size = size
        log.info("model %s: batch size %d on %s", model.key, size, self.device)
        return size

    def _cuda_batch_size(self, model: _Model, shape: tuple[int, ...]) -> int:
        """Largest batch whose activations fit in a share of free memory (probe at 16 rows)."""
        probe = torch.zeros((PROBE_BATCH, *shape), device=self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self._forward(model.module, probe)
        torch.cuda.synchronize(self.device)
        per_row = (torch.cuda.max_memory_allocated(self.device) - base) / PROBE_BATCH
        per_row += 3 * probe[0].numel() * 4  # input buffer, noise and its block copy, float32
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        size = int(free * MEMORY_FRACTION / max(per_row, 1.0))
        size = max(1, min(size, self.max_batch_size))
        return size - size % 32 if size >= 64 else size

    def _finish(self, batch: _Batch) -> None:
        """Wait for a launched batch, report progress and hand finished jobs their counts."""
        try:
            if batch.event is not None:
                batch.event.synchronize()
        except Exception as exc:
            self._fail_batch(batch, exc)
            return
        for sub, k in batch.parts:
            if sub.finished:
                continue
            sub.done += k
            sub.outbox.put(k)
            if sub.done == sub.num:
                assert sub.total is not None
                staged = batch.results.get(sub)
                sub.outbox.put(staged if staged is not None else sub.total.cpu())
                self._retire(sub)

    def _retire(self, sub: _Submission) -> None:
        with self._lock:
            sub.finished = True
            subs = self._groups.get(sub.group)
            if subs is not None and sub in subs:
                subs.remove(sub)
                if not subs:
                    del self._groups[sub.group]

    def _fail_batch(self, batch: _Batch, exc: Exception) -> None:
        for sub, _ in batch.parts:
            if not sub.finished:
                sub.outbox.put(RuntimeError(f"sampling failed on {self.device}: {exc}"))
                self._retire(sub)
