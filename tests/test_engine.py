"""The sampling engine: shared batches give each job exactly its own counts, fairly, cancellably."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from models.networks import DMAEClassifier, preset
from models.smoothing import BatchSampler, NoiseStream, certify, predict
from worker.batching import fair_shares
from worker.engine import Cancelled, Engine, EngineClosed, shared_engine

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return DMAEClassifier(preset("tiny"), NUM_CLASSES, input_size=8).eval()


@pytest.fixture(params=[1, 3], ids=["synchronous", "pipelined"])
def engine(tiny: nn.Module, request: pytest.FixtureRequest) -> Iterator[Engine]:
    """Depth 3 keeps batches in flight while the next ones are built, as on CUDA (depth 2)."""
    eng = Engine("cpu", batch_size=256, pipeline_depth=request.param)
    eng.register("tiny", tiny, NUM_CLASSES)
    yield eng
    eng.close()


def images(count: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.rand((3, 8, 8), generator=g) for _ in range(count)]


def reference(model: nn.Module, x: Tensor, sigma: float, num: int, seed: int) -> Tensor:
    return BatchSampler(model, NUM_CLASSES, batch_size=1000).counts(
        x, sigma, num, NoiseStream(seed, x.shape)
    )


def run_concurrently(engine: Engine, jobs: list[tuple[Tensor, float, int, int]]) -> list[Tensor]:
    """Start every job's counts() at once from its own thread; return the counts in job order."""
    results: list[Tensor | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def job(i: int) -> None:
        x, sigma, num, seed = jobs[i]
        start.wait()
        try:
            results[i] = engine.sampler("tiny").counts(x, sigma, num, NoiseStream(seed, x.shape))
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return [r for r in results if r is not None]


# ---------------------------------------------------------------- sharing a batch


def test_fair_shares_split_a_batch_max_min_fairly() -> None:
    assert fair_shares([10_000, 10_000], 256) == [128, 128]
    assert fair_shares([1_000_000, 30, 1_000], 256) == [113, 30, 113]  # small job fully served
    assert fair_shares([5, 7], 256) == [5, 7]  # less work than a batch: all of it
    assert fair_shares([], 256) == []
    assert fair_shares([9, 9, 9], 0) == [0, 0, 0]
    # The remainder rotates with ``start`` so no job is always the one left short.
    assert fair_shares([50, 50, 50], 4, start=0) == [2, 1, 1]
    assert fair_shares([50, 50, 50], 4, start=1) == [1, 2, 1]
    assert fair_shares([50, 50, 50], 2, start=2) == [1, 0, 1]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        remaining = torch.randint(
            0, 400, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g
        ).tolist()
        cap = int(torch.randint(0, 1000, (1,), generator=g))
        shares = fair_shares(remaining, cap, start=cap)
        assert sum(shares) == min(cap, sum(remaining))
        assert all(0 <= s <= r for s, r in zip(shares, remaining, strict=True))
        # Max-min fair: a job short of its need never gets 2+ fewer rows than any other job.
        short = [s for s, r in zip(shares, remaining, strict=True) if s < r]
        assert not short or max(shares) - min(short) <= 1
    with pytest.raises(ValueError):
        fair_shares([-1], 10)


def test_counts_do_not_depend_on_which_jobs_shared_the_batches(
    engine: Engine, tiny: nn.Module
) -> None:
    xs = images(6)
    jobs = [
        (x, sigma, num, seed)
        for x, sigma, num, seed in zip(
            xs,
            [0.25, 0.5, 1.0, 0.25, 0.5, 0.12],
            [3000, 517, 1000, 77, 2048, 1],
            range(6),
            strict=True,
        )
    ]
    expected = [reference(tiny, x, s, n, seed) for x, s, n, seed in jobs]
    alone = [
        engine.sampler("tiny").counts(x, s, n, NoiseStream(seed, x.shape)) for x, s, n, seed in jobs
    ]
    together = run_concurrently(engine, jobs)
    for (_, _, num, _), want, one, many in zip(jobs, expected, alone, together, strict=True):
        assert int(want.sum()) == num
        assert torch.equal(one, want)
        assert torch.equal(many, want)


def test_certificates_through_the_engine_equal_the_plain_loop(
    engine: Engine, tiny: nn.Module
) -> None:
    x = images(1)[0]
    plain = BatchSampler(tiny, NUM_CLASSES, batch_size=1000)
    done: list[int] = []
    ours = certify(engine.sampler("tiny"), x, 0.25, 100, 1500, 0.001, seed=7, progress=done.append)
    theirs = certify(plain, x, 0.25, 100, 1500, 0.001, seed=7)
    for field in ("prediction", "abstained", "radius", "pa_lower", "counts", "count_a"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert sum(done) == 1600 and all(k > 0 for k in done)
    top2 = predict(engine.sampler("tiny"), x, 0.25, 700, 0.001, seed=3)
    assert top2.counts == predict(plain, x, 0.25, 700, 0.001, seed=3).counts


def test_returned_counts_are_ordinary_host_tensors(engine: Engine) -> None:
    x = images(1)[0]
    counts = engine.sampler("tiny").counts(x, 0.5, 10, NoiseStream(0, x.shape))
    assert counts.device.type == "cpu" and counts.dtype == torch.long
    counts += 1  # an inference-mode tensor would refuse this
    zero = engine.sampler("tiny").counts(x, 0.5, 0, NoiseStream(0, x.shape))
    assert zero.tolist() == [0] * NUM_CLASSES


class Marker(nn.Module):
    """Logs, per forward pass, how many rows came from the job whose image is all +1 vs -1."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[int, int]] = []
        self.gate = threading.Event()

    def forward(self, x: Tensor) -> Tensor:
        self.gate.wait(30)
        mean = x.flatten(1).mean(1)
        self.log.append((int((mean > 0).sum()), int((mean < 0).sum())))
        return torch.stack([mean, -mean], dim=1)


def test_a_small_job_is_not_starved_by_a_large_one() -> None:
    model = Marker()
    with Engine("cpu", batch_size=100) as eng:
        eng.register("tiny", model, 2)
        small_x, big_x = torch.ones(3, 2, 2), -torch.ones(3, 2, 2)
        big = threading.Thread(
            target=lambda: eng.sampler("tiny").counts(
                big_x, 0.01, 30_000, NoiseStream(1, big_x.shape)
            )
        )
        big.start()
        while not eng.pending():
            threading.Event().wait(0.01)
        small = run_concurrently_with_gate(eng, model, small_x)
        big.join(120)
    assert small.tolist() == [1000, 0]
    first = next(i for i, (s, _) in enumerate(model.log) if s)
    # From the batch it joined on, the small job gets half of every (full) batch until done.
    assert model.log[first : first + 20] == [(50, 50)] * 20
    assert all(s == 0 for s, _ in model.log[first + 20 :])
    assert sum(b for _, b in model.log) == 30_000


def run_concurrently_with_gate(eng: Engine, model: Marker, x: Tensor) -> Tensor:
    """Submit a 1,000-sample job while the engine is held in its first batch, then release it."""
    out: list[Tensor] = []
    t = threading.Thread(
        target=lambda: out.append(
            eng.sampler("tiny").counts(x, 0.01, 1000, NoiseStream(2, x.shape))
        )
    )
    t.start()
    while eng.pending() < 2:
        threading.Event().wait(0.01)
    model.gate.set()
    t.join(120)
    return out[0]


# ---------------------------------------------------------------- cancellation and errors


class CancelOnCall(nn.Module):
    """Wraps a model; sets ``event`` during its ``at``-th forward pass (a cancel mid-batch)."""

    def __init__(self, inner: nn.Module, event: threading.Event, at: int):
        super().__init__()
        self.inner, self.event, self.at, self.calls = inner, event, at, 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == self.at:
            self.event.set()
        return self.inner(x)


def test_a_cancelled_job_takes_part_in_no_further_batch(tiny: nn.Module) -> None:
    cancel = threading.Event()
    model = CancelOnCall(tiny, cancel, at=3)
    x = images(1)[0]
    with Engine("cpu", batch_size=64) as eng:
        eng.register("tiny", model, NUM_CLASSES)
        done: list[int] = []
        with pytest.raises(Cancelled):
            certify(
                eng.sampler("tiny", cancel=cancel),
                x,
                0.25,
                10,
                100_000,
                0.001,
                seed=1,
                progress=done.append,
            )
        assert model.calls == 3  # cancelled during batch 3: no batch 4 was run for it
        assert sum(done) <= 10 + 3 * 64
        # The engine goes on serving other jobs, with their exact counts.
        counts = eng.sampler("tiny").counts(x, 0.25, 300, NoiseStream(5, x.shape))
        assert torch.equal(counts, reference(tiny, x, 0.25, 300, 5))
        calls = model.calls
        with pytest.raises(Cancelled):  # already cancelled: no sampling at all
            eng.sampler("tiny", cancel=cancel).counts(x, 0.25, 10, NoiseStream(0, x.shape))
        assert model.calls == calls


def test_a_progress_callback_that_raises_stops_the_job(engine: Engine, tiny: nn.Module) -> None:
    class JobCancelled(Exception):
        pass

    calls: list[int] = []

    def progress(k: int) -> None:
        calls.append(k)
        raise JobCancelled

    x = images(1)[0]
    with pytest.raises(JobCancelled):
        engine.sampler("tiny").counts(x, 0.25, 1_000_000, NoiseStream(1, x.shape), progress)
    assert calls == [256]
    counts = engine.sampler("tiny").counts(x, 0.25, 500, NoiseStream(4, x.shape))
    assert torch.equal(counts, reference(tiny, x, 0.25, 500, 4))
    assert engine.pending() == 0
    assert engine.stats["rows"] < 100_000  # the million-sample job was dropped early


class OutOfMemoryAbove(nn.Module):
    """Raises the CUDA allocator's error for batches over ``limit`` rows, like a full device."""

    def __init__(self, inner: nn.Module, limit: int):
        super().__init__()
        self.inner, self.limit = inner, limit

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"tried {x.shape[0]} rows")
        return self.inner(x)


def test_out_of_memory_halves_the_batch_and_keeps_the_counts(tiny: nn.Module) -> None:
    x = images(1)[0]
    with Engine("cpu", batch_size=256) as eng:
        eng.register("tiny", OutOfMemoryAbove(tiny, 64), NUM_CLASSES)
        counts = eng.sampler("tiny").counts(x, 0.5, 1000, NoiseStream(9, x.shape))
        assert eng.batch_size("tiny") == 64
        assert eng.stats["oom_backoffs"] == 2
    assert torch.equal(counts, reference(tiny, x, 0.5, 1000, 9))


def test_compiled_models_get_fixed_size_padded_batches(tiny: nn.Module) -> None:
    shapes: list[int] = []

    class Shapes(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            shapes.append(x.shape[0])
            return tiny(x)

    x = images(1)[0]
    with Engine("cpu", batch_size=128, compile=True, compile_backend="eager") as eng:
        eng.register("tiny", Shapes(), NUM_CLASSES)
        counts = eng.sampler("tiny").counts(x, 0.5, 300, NoiseStream(2, x.shape))
        assert eng.stats["padded_rows"] == 3 * 128 - 300
    assert set(shapes) == {128}  # one static shape: no recompilation, CUDA graphs reusable
    assert torch.equal(counts, reference(tiny, x, 0.5, 300, 2))


def test_jobs_on_different_models_each_get_their_own_counts(tiny: nn.Module) -> None:
    torch.manual_seed(1)
    other = DMAEClassifier(preset("tiny"), 3, input_size=12).eval()
    x8, x12 = images(1)[0], torch.rand(3, 12, 12)
    with Engine("cpu", batch_size=200) as eng:
        eng.register("tiny", tiny, NUM_CLASSES)
        eng.register("other", other, 3)
        out: dict[str, Tensor] = {}
        threads = [
            threading.Thread(
                target=lambda: out.__setitem__(
                    "a", eng.sampler("tiny").counts(x8, 0.5, 900, NoiseStream(1, x8.shape))
                )
            ),
            threading.Thread(
                target=lambda: out.__setitem__(
                    "b", eng.sampler("other").counts(x12, 0.5, 700, NoiseStream(1, x12.shape))
                )
            ),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert torch.equal(out["a"], reference(tiny, x8, 0.5, 900, 1))
    want = BatchSampler(other, 3).counts(x12, 0.5, 700, NoiseStream(1, x12.shape))
    assert torch.equal(out["b"], want)


class Broken(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise ValueError("weights are garbage")


def test_errors_reach_the_job_with_a_message_and_the_engine_survives(tiny: nn.Module) -> None:
    x = images(1)[0]
    with Engine("cpu", batch_size=64) as eng:
        eng.register("broken", Broken(), 2)
        eng.register("tiny", tiny, NUM_CLASSES)
        with pytest.raises(RuntimeError, match="weights are garbage"):
            eng.sampler("broken").counts(x, 0.5, 100, NoiseStream(0, x.shape))
        with pytest.raises(KeyError, match="registered: broken, tiny"):
            eng.sampler("missing")
        eng.register("tiny", tiny, NUM_CLASSES)  # the same model again: nothing changes
        with pytest.raises(ValueError, match="different model is already registered"):
            eng.register("tiny", Broken(), NUM_CLASSES)
        with pytest.raises(ValueError, match="one image tensor"):
            eng.sampler("tiny").counts(x[None], 0.5, 10, NoiseStream(0, x[None].shape))
        with pytest.raises(ValueError, match="does not match"):
            eng.sampler("tiny").counts(x, 0.5, 10, NoiseStream(0, (3, 4, 4)))
        counts = eng.sampler("tiny").counts(x, 0.5, 100, NoiseStream(0, x.shape))
        assert torch.equal(counts, reference(tiny, x, 0.5, 100, 0))
    with pytest.raises(EngineClosed):
        eng.sampler("tiny").counts(x, 0.5, 100, NoiseStream(0, x.shape))


def test_closing_releases_waiting_jobs(tiny: nn.Module) -> None:
    gate = Marker()
    eng = Engine("cpu", batch_size=10)
    eng.register("held", gate, 2)
    errors: list[BaseException] = []
    x = torch.ones(3, 2, 2)

    def job() -> None:
        try:
            eng.sampler("held").counts(x, 0.1, 1000, NoiseStream(0, x.shape))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=job)
    t.start()
    while not eng.pending():
        threading.Event().wait(0.01)
    closer = threading.Thread(target=eng.close)
    closer.start()
    gate.gate.set()
    closer.join(30)
    t.join(30)
    assert len(errors) == 1 and isinstance(errors[0], EngineClosed)


def test_unregistering_a_model_releases_its_waiting_jobs(tiny: nn.Module) -> None:
    gate = Marker()
    errors: list[BaseException] = []
    x = torch.ones(3, 2, 2)
    with Engine("cpu", batch_size=10) as eng:
        eng.register("held", gate, 2)

        def job() -> None:
            try:
                eng.sampler("held").counts(x, 0.1, 1000, NoiseStream(0, x.shape))
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=job)
        t.start()
        while not eng.pending():
            threading.Event().wait(0.01)
        eng.unregister("held")
        gate.gate.set()
        t.join(30)
        assert eng.pending() == 0 and eng.models() == []
        with pytest.raises(KeyError):
            eng.sampler("held")
        eng.register("held", tiny, NUM_CLASSES)  # the key is free again
    assert len(errors) == 1 and "unloaded" in str(errors[0])


def test_shared_engine_is_one_per_device_and_process() -> None:
    first = shared_engine("cpu")
    assert shared_engine(torch.device("cpu")) is first
    first.close()
    second = shared_engine("cpu")  # a closed engine is replaced
    assert second is not first and not second.closed
    second.close()
