"""Service settings: environment variables prefixed ``DMAE_`` (no ``.env`` file is read).

Every setting has a description; ``docs/API.md`` lists them and ``.env.example`` sets them.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration of the API, the workers and the embedded runner, from ``DMAE_*``
    environment variables only. A ``.env`` file is not read: it is docker-compose's (compose
    hands its variables to the containers' environment), and read by the service it made
    ``make run`` and the CLI look for the compose host ``postgres`` (see
    :func:`unread_env_file`)."""

    model_config = SettingsConfigDict(env_prefix="DMAE_", env_file=None, extra="ignore")

    data_dir: Path = Field(
        default=Path("data"),
        description="Local data folder: the embedded SQLite database and uploaded checkpoints.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL of the database (Postgres in production, e.g. "
        "postgresql+psycopg://user@db/dmae). Empty: SQLite file DATA_DIR/dmae.sqlite3.",
    )
    broker_url: str = Field(
        default="",
        description="Celery broker (Redis) URL, e.g. redis://redis:6379/0. Empty: jobs run on "
        "an in-process runner inside the API (the embedded default).",
    )
    queue: str = Field(
        default="dmae", description="Celery queue the API sends jobs to and workers read."
    )
    checkpoint_dir: Path | None = Field(
        default=None,
        description="Server-side folder from which admins may register checkpoints by path "
        "(nothing outside it is accepted). Default: DATA_DIR/checkpoints.",
    )
    dataset_dir: Path | None = Field(
        default=None,
        description="Server-side folder holding datasets (ImageFolder layout); training runs and "
        "evaluations accept folders inside it or the built-in digits:train|test and "
        "mnist:train|test. Default: DATA_DIR/datasets.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Where models run: auto picks CUDA when available, else the CPU.",
    )
    max_upload_bytes: int = Field(
        default=10 * 1024 * 1024,
        gt=0,
        description="Largest accepted image upload (bytes); larger: 413.",
    )
    max_checkpoint_bytes: int = Field(
        default=4 * 1024**3,
        gt=0,
        description="Largest accepted checkpoint upload (bytes); larger: 413.",
    )
    max_image_pixels: int = Field(
        default=40_000_000,
        gt=0,
        description="Largest accepted image (width x height), checked before decoding. An API "
        "process converts at most twice this many pixels at once (about 20 bytes each).",
    )
    n_max: int = Field(
        default=100_000, gt=0, description="Largest accepted n (estimation samples)."
    )
    n0_max: int = Field(
        default=10_000, gt=0, description="Largest accepted n0 (selection samples)."
    )
    batch_size: int = Field(
        default=0,
        ge=0,
        description="Noisy samples per forward pass; 0: chosen per model by the engine (256 on "
        "CPU; from free memory on CUDA, halved on out-of-memory).",
    )
    max_attempts: int = Field(
        default=3, gt=0, description="A job whose worker vanished this many times is failed."
    )
    visibility_timeout_s: int = Field(
        default=24 * 3600,
        gt=0,
        description="Redis visibility timeout (s): longer than the longest job or training run, "
        "so a slow task is never handed to a second worker while the first still runs.",
    )
    sweep_interval_s: float = Field(
        default=30.0,
        ge=0,
        description="Seconds between sweeps that re-enqueue stuck jobs and fail abandoned ones "
        "(0 disables the sweep).",
    )
    requeue_after_s: float = Field(
        default=300.0,
        ge=0,
        description="A job still queued this long after it was last sent to the broker is sent "
        "again (a lost message, a broker restart).",
    )
    heartbeat_s: float = Field(
        default=2.0, gt=0, description="Seconds between progress/heartbeat writes of a running job."
    )
    stale_after_s: float = Field(
        default=60.0,
        gt=0,
        description="A running job whose heartbeat is older than this lost its worker: it is "
        "re-queued, or failed once it has used MAX_ATTEMPTS.",
    )
    runner_threads: int = Field(
        default=4,
        gt=0,
        description="Threads of the embedded in-process runner (no broker); their jobs share "
        "the batching engine's batches, and a training run takes one thread.",
    )
    api_threads: int = Field(
        default=40,
        ge=1,
        le=200,
        description="Worker threads per API process that run the routes' database work (AnyIO's "
        "thread limiter); requests beyond them wait on the event loop. Fewer threads contend "
        "less for the interpreter lock: see docs/PERFORMANCE.md.",
    )
    model_cache_size: int = Field(
        default=4,
        gt=0,
        description="Models kept loaded per worker process (least recently used out).",
    )
    register_bundled: bool = Field(
        default=True, description="Register the bundled models (e.g. digits-s0.25) at start-up."
    )
    jobs_page_max: int = Field(default=100, gt=0, description="Largest page size of GET /jobs.")
    max_active_jobs: int = Field(
        default=100,
        ge=0,
        description="Admission control: a client (API key) may have at most this many jobs "
        "queued or running; a submission beyond it gets 429 with Retry-After (0: no cap).",
    )
    max_evaluation_images: int = Field(
        default=10_000,
        gt=0,
        description="Largest evaluation (POST /evaluations): images after skip and max; more: "
        "422. The jobs of an evaluation in progress count against MAX_ACTIVE_EVALUATIONS, not "
        "MAX_ACTIVE_JOBS.",
    )
    max_active_evaluations: int = Field(
        default=2,
        ge=0,
        description="Admission control for evaluations: a client may have at most this many "
        "evaluations with images still queued or running; one more gets 429 with Retry-After "
        "(0: no cap). A key's queued or running jobs are thus at most MAX_ACTIVE_JOBS + "
        "MAX_ACTIVE_EVALUATIONS x MAX_EVALUATION_IMAGES.",
    )
    max_archive_bytes: int = Field(
        default=256 * 1024**2,
        gt=0,
        description="Largest uploaded evaluation archive (zip, tar, tar.gz; bytes as sent); "
        "larger: 413.",
    )
    max_archive_members: int = Field(
        default=20_000,
        gt=0,
        description="Most entries (files and folders) an evaluation archive may hold; more: 413 "
        "(checked before the archive's index is read).",
    )
    max_archive_expanded_bytes: int = Field(
        default=1024**3,
        gt=0,
        description="Most bytes an evaluation archive may expand to (its members, and for a "
        "compressed tar the whole decompressed stream); more: 413, counted while reading, so a "
        "compression bomb stops there. Each image is also capped by MAX_UPLOAD_BYTES.",
    )
    rate_limit_requests: int = Field(
        default=3000,
        ge=0,
        description="Requests one API key may make per RATE_LIMIT_WINDOW_S; more get 429 with "
        "Retry-After (0: no limit). Counted in Redis (RATE_LIMIT_URL, else a redis:// "
        "BROKER_URL) so the limit holds across API processes; in memory otherwise.",
    )
    rate_limit_window_s: int = Field(
        default=60, gt=0, description="Length of the fixed rate-limit window (s)."
    )
    rate_limit_url: str = Field(
        default="",
        description="Redis URL holding the rate-limit counters. Empty: the broker URL when it "
        "is a Redis URL, else counters are kept in the API process's memory.",
    )
    idempotency_ttl_s: float = Field(
        default=24 * 3600.0,
        gt=0,
        description="How long an Idempotency-Key of POST /certify is remembered (s).",
    )
    idempotency_in_flight_s: float = Field(
        default=120.0,
        gt=0,
        description="A request holding an Idempotency-Key for longer than this (s) is presumed "
        "dead, and a retry with that key may proceed (before that: 409).",
    )
    unsent_grace_s: float = Field(
        default=10.0,
        ge=0,
        description="The sweep sends a queued job that was never handed to the broker (it was "
        "down at submission) once it is this old (s).",
    )

    key_cache_s: float = Field(
        default=5.0,
        ge=0,
        description="Seconds an API process remembers a valid key without asking the database; "
        "a revoked key stops working within this time (0: ask on every request).",
    )
    registry_cache_s: float = Field(
        default=2.0,
        ge=0,
        description="Seconds an API process reuses its snapshot of the model registry when "
        "choosing a submission's model; a model (de)activated through another process is seen "
        "within this time (0: read the registry on every submission).",
    )
    metrics_require_admin: bool = Field(
        default=False,
        description="GET /metrics needs an admin API key (default: open, for Prometheus).",
    )
    signing_key: str = Field(
        default="",
        description="PEM file (PKCS#8) of the Ed25519 private key that signs certificates; it "
        "must exist. Empty: DATA_DIR/signing/signing_key.pem, generated at first start (0600). "
        "The API and every worker need the same key (a shared data folder, or this setting).",
    )
    seed_secret_file: str = Field(
        default="",
        description="File holding the secret mixed into derived seeds (HMAC-SHA256), so nobody "
        "can predict a job's noise before submitting it; it must exist. Empty: "
        "DATA_DIR/signing/seed_secret, generated at first start (0600).",
    )
    allow_client_seed: bool | None = Field(
        default=None,
        description="Accept seeds chosen by clients (a known seed lets a client predict the "
        "noise and submit only lucky inputs). Unset: allowed in the embedded default (no "
        "broker; research use), refused with a broker. Certificates say seed_source.",
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Log lines of `serve` and `worker`: text, or json (one JSON object a line, "
        "job events with job_id, status, model, mode and durations as keys).",
    )

    @model_validator(mode="after")
    def _defaults_under_data_dir(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'dmae.sqlite3').resolve()}"
        if self.checkpoint_dir is None:
            self.checkpoint_dir = self.data_dir / "checkpoints"
        if self.dataset_dir is None:
            self.dataset_dir = self.data_dir / "datasets"
        return self

    @property
    def embedded(self) -> bool:
        """No broker: jobs run inside the API process."""
        return not self.broker_url

    @property
    def client_seeds_allowed(self) -> bool:
        """Whether POST /certify accepts a client's seed (default: only when embedded)."""
        return self.embedded if self.allow_client_seed is None else self.allow_client_seed

    @property
    def signing_dir(self) -> Path:
        """Where the generated signing key, the seed secret and the public keys live."""
        return self.data_dir / "signing"

    @property
    def rate_limit_redis(self) -> str:
        """The Redis URL of the rate-limit counters ('' keeps them in memory)."""
        url = self.rate_limit_url or self.broker_url
        return url if url.startswith(("redis://", "rediss://", "unix://")) else ""

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def checkpoints(self) -> Path:
        """The server-side checkpoint folder (always set after validation)."""
        assert self.checkpoint_dir is not None
        return self.checkpoint_dir

    @property
    def datasets(self) -> Path:
        """The server-side dataset folder (always set after validation)."""
        assert self.dataset_dir is not None
        return self.dataset_dir

    @property
    def uploads(self) -> Path:
        """Where uploaded checkpoints and trained models are stored (shared with workers)."""
        return self.data_dir / "models"

    def private_folders(self) -> list[tuple[str, str]]:
        """(absolute path, what a client is told instead) of each server folder that no answer
        may name: the data, checkpoint, dataset and model folders and the temporary folder, as
        configured and resolved; longest first, so a folder inside another is named as itself."""
        import tempfile

        named = [
            (self.checkpoints, "<checkpoint folder>"),
            (self.datasets, "<dataset folder>"),
            (self.uploads, "<model folder>"),
            (self.data_dir, "<data folder>"),
            (Path(tempfile.gettempdir()), "<temporary folder>"),
        ]
        found: dict[str, str] = {}
        for path, label in named:
            for form in (path, path.absolute(), path.resolve()):
                text = str(form)
                if form.is_absolute() and len(form.parts) > 1:
                    found.setdefault(text, label)
        return sorted(found.items(), key=lambda pair: -len(pair[0]))

    def torch_device(self) -> str:
        """The device name models run on."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()


def unread_env_file(path: Path = Path(".env")) -> str | None:
    """A warning when ``path`` sets ``DMAE_*`` variables that this process does not have: the
    service reads only its environment (``.env`` is docker-compose's file), so those settings
    do not apply here. None when there is no such file or it sets none."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    names = []
    for line in lines:
        name, is_setting, _ = line.strip().removeprefix("export ").partition("=")
        name = name.strip()
        if is_setting and name.upper().startswith("DMAE_") and name not in os.environ:
            names.append(name)
    if not names:
        return None
    return (
        f"{path} sets {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}, which do not "
        "apply here: the service reads only environment variables (.env is docker-compose's "
        "file); export them to use them"
    )
