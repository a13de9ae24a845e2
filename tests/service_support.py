"""Helpers and fixtures for the service tests (imported by tests/test_service_*.py).

A tiny random-weight DMAE classifier (digits-sized, with a head bias so it has a clear
favourite class), digit images as PNG bytes, the reference certificate computed directly with
the core, and real Postgres databases / Redis queues with unique names that are removed after.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import torch
from PIL import Image
from preflight import PG_ADMIN_URL, REDIS_URL  # DMAE_TEST_POSTGRES, DMAE_TEST_REDIS
from sqlalchemy.engine import make_url

from domain.config import Settings

SIGMA = 0.25
FAVOURITE = 3  # the class the tiny model leans to


# An API key (id 1) and a model (id 1) as raw rows: what the migration tests insert into an
# older schema before upgrading it (the columns of both tables are the same in every version).
OLD_KEY_AND_MODEL = (
    "INSERT INTO api_keys (id, name, key_prefix, key_hash, is_admin, created_at) "
    "VALUES (1, 'a', 'p', 'h', false, CURRENT_TIMESTAMP)",
    "INSERT INTO checkpoints (id, name, location, file_sha256, weights_sha256, format, "
    "kind, num_classes, classes, input_size, arch, licence, source, import_options, "
    "active, created_at) VALUES (1, 'm', 'x', 'f', 'w', 'project', 'classifier', 10, "
    "'[]', 8, '{}', '', '', '{}', true, CURRENT_TIMESTAMP)",
)


def make_checkpoint(
    path: Path, sigma: float = SIGMA, name: str = "tiny-s0.25", bias: float = 1.5
) -> Path:
    """A tiny classifier checkpoint (8x8 RGB inputs, 10 digit classes) with fixed random weights."""
    from models.checkpoints import CheckpointMeta, save_checkpoint
    from models.data import DIGITS_MEAN, DIGITS_STD
    from models.networks import DMAEClassifier, preset

    torch.manual_seed(0)
    arch = preset("tiny")
    model = DMAEClassifier(arch, 10, input_size=8, mean=DIGITS_MEAN, std=DIGITS_STD)
    with torch.no_grad():
        model.head.bias[FAVOURITE] += bias
    meta = CheckpointMeta(
        kind="classifier",
        arch=arch,
        input_size=8,
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        num_classes=10,
        classes=[f"digit-{i}" for i in range(10)],
        sigma=sigma,
        name=name,
    )
    save_checkpoint(path, model, meta)
    return path


def digit_png(index: int = 0) -> bytes:
    """Test digit ``index`` (scikit-learn digits) as an 8x8 RGB PNG."""
    from models.data import load_digits_split

    x, _, _ = load_digits_split("test")
    arr = (x[index].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def reference(
    checkpoint: Path,
    png: bytes,
    *,
    mode: str = "certify",
    sigma: float,
    alpha: float,
    n0: int,
    n: int,
    seed: int,
    batch_size: int,
) -> dict[str, Any]:
    """The certificate the core computes for this image, model, parameters and seed."""
    from models.checkpoints import load_classifier_with_meta
    from models.data import preprocess
    from models.smoothing import BatchSampler, certify, predict

    model, meta = load_classifier_with_meta(checkpoint)
    x = preprocess(Image.open(io.BytesIO(png)), meta.input_size)
    sampler = BatchSampler(model, meta.num_classes, batch_size, "cpu")
    if mode == "predict":
        cert = predict(sampler, x, sigma, n, alpha, seed)
    else:
        cert = certify(sampler, x, sigma, n0, n, alpha, seed, top2=mode == "certify_top2")
    return cert.to_dict()


CORE_FIELDS = (
    "mode",
    "prediction",
    "abstained",
    "abstain_reason",
    "radius",
    "pa_lower",
    "pb_upper",
    "count_a",
    "count_b",
    "counts",
    "n0",
    "n",
    "alpha",
    "sigma",
    "max_radius",
    "seed",
    "pvalue",
    "input_shape",
    "space",
)


def assert_same_certificate(got: dict[str, Any], want: dict[str, Any]) -> None:
    for key in CORE_FIELDS:
        assert got[key] == want[key], f"{key}: service {got[key]!r} != core {want[key]!r}"


def service_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test service: its own data folder, CPU, no bundled models, no .env;
    client seeds accepted even with a broker (the tests compare with the core at fixed seeds),
    and one fixed seed secret, so derived seeds (and the outcomes tests check) are the same on
    every run (pass ``seed_secret_file`` to choose another)."""
    if "seed_secret_file" not in overrides:
        secret = data_dir / "test-seed-secret"
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_text("a fixed secret of the test suite, so derived seeds repeat\n")
        overrides["seed_secret_file"] = str(secret)
    values: dict[str, Any] = dict(
        data_dir=data_dir,
        allow_client_seed=True,
        register_bundled=False,
        device="cpu",
        batch_size=64,
        runner_threads=1,  # one job at a time: a second submission stays queued
        heartbeat_s=0.2,
        sweep_interval_s=0.5,
        stale_after_s=30,
    )
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def wait_for(
    get: Any,
    job_url: str,
    key: str,
    timeout: float = 300.0,
    until: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
) -> dict[str, Any]:
    """Poll GET ``job_url`` until its status is in ``until``."""
    deadline = time.monotonic() + timeout
    while True:
        r = get(job_url, headers={"X-API-Key": key})
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        if body["status"] in until:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{job_url} still {body['status']} after {timeout}s: {body}")
        time.sleep(0.05)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A tiny classifier inside the test service's checkpoint folder (DATA_DIR/checkpoints)."""
    return make_checkpoint(tmp_path / "data" / "checkpoints" / "tiny.safetensors")


def _admin_conn() -> psycopg.Connection[Any]:
    url = make_url(PG_ADMIN_URL).set(drivername="postgresql")
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, empty Postgres database for this test session (dropped afterwards)."""
    name = f"dmae_test_{uuid.uuid4().hex[:12]}"
    try:
        conn = _admin_conn()
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is needed at {PG_ADMIN_URL} (run .ci/run or start it): {exc}")
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        from domain.store.db import _databases

        for url in [u for u in _databases if name in u]:
            _databases.pop(url).dispose()
        with _admin_conn() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def reset_postgres(url: str) -> None:
    """Drop every table of the test database (so each test migrates from scratch)."""
    with psycopg.connect(
        make_url(url).set(drivername="postgresql").render_as_string(hide_password=False),
        autocommit=True,
    ) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database URL, once SQLite and once a fresh Postgres database (migrations and
    concurrency tests run on both)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.sqlite3'}"
    url: str = request.getfixturevalue("pg_url")
    reset_postgres(url)
    return url


@contextlib.contextmanager
def redis_cleaned() -> Iterator[None]:
    """Deletes, after the block, every key of the test Redis database that appeared during it:
    a queue's own keys and those Celery and kombu write beside them without the queue's name
    (``_kombu.binding_deadlines`` of a worker's pidbox, ``unacked*``), rate-limit counters.
    Use it around whatever talks to the test Redis (the session ends with a check that no key
    is left: see tests/conftest.py)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        before = set(client.scan_iter())
    except redis.exceptions.ConnectionError as exc:
        client.close()
        pytest.fail(f"Redis is needed at {REDIS_URL} (run .ci/run or start it): {exc}")
    try:
        yield
    finally:
        for key in set(client.scan_iter()) - before:
            client.delete(key)
        client.close()


@pytest.fixture
def redis_keys_cleaned() -> Iterator[None]:
    """:func:`redis_cleaned` around one test (for modules whose tests use the test Redis)."""
    with redis_cleaned():
        yield


@pytest.fixture(scope="module")
def redis_keys_cleaned_module() -> Iterator[None]:
    """:func:`redis_cleaned` around a module (one whose worker lives through its tests)."""
    with redis_cleaned():
        yield


@pytest.fixture
def redis_queue() -> Iterator[str]:
    """A unique Celery queue name on the test Redis; every key made meanwhile is deleted after."""
    with redis_cleaned():
        yield f"dmae-test-{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def serve_process(root: Path, env: dict[str, str], *args: str) -> Iterator[tuple[str, Path]]:
    """``dmae-certify serve`` (plus ``args``) in ``root`` on a free port with ``env``, until it
    answers /readyz; yields (base URL, log file) and stops it afterwards."""
    from fault_support import free_port, terminate

    cli = str(Path(sys.executable).parent / "dmae-certify")
    port = free_port()
    log_path = root / "serve.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [cli, "serve", "--port", str(port), *args],
        env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        yield base, log_path
    finally:
        terminate(proc)
        log.close()
