"""``dmae-certify serve | worker | keys | db``: run and administer the certification service.

Settings come from ``DMAE_*`` environment variables and ``.env`` (see ``domain.config``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def register(sub: Any) -> None:
    s = sub.add_parser(
        "serve",
        help="start the HTTP API (jobs run in-process unless DMAE_BROKER_URL is set)",
    )
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    s.add_argument("--log-level", default="info", help="debug, info, warning (default info)")
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        help="API processes (default 1); more than 1 needs DMAE_BROKER_URL (Celery workers run "
        "the jobs), since the embedded runner lives in the one API process",
    )
    s.set_defaults(func=_database_errors(serve))

    w = sub.add_parser("worker", help="start a Celery worker (one per GPU) for DMAE_BROKER_URL")
    w.add_argument(
        "--pool",
        choices=("prefork", "threads", "solo"),
        default="prefork",
        help="prefork (default): jobs run in a child process, so the parent never touches "
        "CUDA and a crashed job's task is redelivered; threads: CONCURRENCY jobs share one "
        "process and its models; solo: in the worker process itself",
    )
    w.add_argument(
        "--concurrency", type=int, default=1, help="jobs at once in this worker (default 1)"
    )
    w.add_argument("--queues", default=None, help="queues to consume (default DMAE_QUEUE)")
    w.add_argument("--log-level", default="info")
    w.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve this worker's Prometheus metrics on this port (default: none)",
    )
    w.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        help="interface of --metrics-port (default %(default)s)",
    )
    w.set_defaults(func=_database_errors(worker))

    k = sub.add_parser("keys", help="manage API keys")
    ks = k.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = ks.add_parser("create", help="create a key and print it (it is stored only hashed)")
    kc.add_argument("--admin", action="store_true", help="may also use the /admin routes")
    kc.add_argument("--name", default="", help="a note on whom the key is for")
    kc.set_defaults(func=_database_errors(keys_create))
    kl = ks.add_parser("list", help="list keys (never their tokens)")
    kl.set_defaults(func=_database_errors(keys_list))
    kr = ks.add_parser("revoke", help="revoke a key by id")
    kr.add_argument("id", type=int)
    kr.set_defaults(func=_database_errors(keys_revoke))
    krs = ks.add_parser(
        "rotate-signing",
        help="replace the certificate signing key; old public keys stay published at GET /keys",
    )
    krs.set_defaults(func=keys_rotate_signing)

    d = sub.add_parser("db", help="database schema migrations (DMAE_DATABASE_URL)")
    ds = d.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    du = ds.add_parser("upgrade", help="migrate to the latest schema (or --revision)")
    du.add_argument("--revision", default="head")
    du.set_defaults(func=_database_errors(db_upgrade))
    dd = ds.add_parser("downgrade", help="step back one revision (or to --revision, 'base')")
    dd.add_argument("--revision", default="-1")
    dd.set_defaults(func=_database_errors(db_downgrade))
    dc = ds.add_parser("current", help="print the schema revision")
    dc.set_defaults(func=_database_errors(db_current))


def _database_errors(func: Any) -> Any:
    """Run a command, turning an unreachable database into a one-line error (no traceback)."""

    def run(args: argparse.Namespace) -> int:
        from sqlalchemy.exc import OperationalError

        try:
            return int(func(args) or 0)
        except OperationalError as exc:
            first = str(exc.orig or exc).strip().splitlines()[0][:300]
            raise ValueError(f"cannot use the database (DMAE_DATABASE_URL): {first}") from exc

    run.__name__ = func.__name__
    run.__doc__ = func.__doc__
    return run


def _logging(level: str) -> None:
    """Log lines to stderr: text, or JSON objects with DMAE_LOG_FORMAT=json."""
    from domain.config import get_settings

    handler = logging.StreamHandler(sys.stderr)
    if get_settings().log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("dmae").setLevel(level.upper())
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def _ready_database() -> Any:
    from domain.config import get_settings, unread_env_file
    from domain.store.migrate import SchemaNotReady, prepare_database
    from domain.trust import signing

    settings = get_settings()
    unread = unread_env_file()
    if unread is not None:
        logging.getLogger("dmae.api").warning(unread)
    try:
        prepare_database(settings)
    except SchemaNotReady as exc:
        raise ValueError(str(exc)) from exc
    signing.signer(settings)  # the signing key (made at first start) and the seed secret:
    signing.seed_secret(settings)  # a missing or unusable file is an error before serving
    return settings


def serve(args: argparse.Namespace) -> int:
    import os
    import tempfile

    import uvicorn

    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker process counts into one folder that GET /metrics adds up.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="dmae-metrics-")
    _logging(args.log_level)
    settings = _ready_database()  # a schema problem is a clear error before the server starts
    if args.workers > 1 and settings.embedded:
        raise ValueError(
            "--workers needs DMAE_BROKER_URL: the embedded in-process runner (no broker) runs "
            "jobs inside the one API process; start Celery workers and set the broker URL to "
            "serve with several API processes"
        )
    from cli import processes

    mode = "embedded runner, " if settings.embedded else "Celery broker, "
    where = settings.database_url.split("@")[-1]
    if args.workers > 1:  # each process builds its app from the same environment
        if args.port != 0:
            processes._check_free(args.host, args.port)  # refused before "serving on"
        logging.getLogger("dmae.api").info(
            "serving on %s (%sdatabase %s)", base_url(args.host, args.port), mode, where
        )
        return processes.serve_processes(
            args.workers, args.host, args.port, args.log_level, _logging
        )
    from cli.asgi import create_app

    sock = processes.bound_socket(args.host, args.port)  # a port in use: the error, no log
    url = base_url(args.host, sock.getsockname()[1])
    logging.getLogger("dmae.api").info("serving on %s (%sdatabase %s)", url, mode, where)
    api = create_app(settings)
    api.state.base_url = url  # for the start-up log's example command
    config = uvicorn.Config(api, host=args.host, port=args.port, log_level=args.log_level)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def base_url(host: str, port: int) -> str:
    """The URL a client on this machine reaches ``serve`` at (a wildcard bind via loopback)."""
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def worker(args: argparse.Namespace) -> int:
    if args.metrics_port is not None:
        _metrics_folder(args.pool)  # before anything imports prometheus_client
    _logging(args.log_level)
    settings = _ready_database()
    if settings.embedded:
        raise ValueError(
            "DMAE_BROKER_URL is not set: without a broker, `dmae-certify serve` runs jobs "
            "in-process; set it (e.g. redis://localhost:6379/0) to use Celery workers"
        )
    if args.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    from worker.celery_app import app

    if args.metrics_port is not None:
        _serve_metrics(args.metrics_port, args.metrics_host)
    app.worker_main(
        [
            "worker",
            f"--loglevel={args.log_level.upper()}",
            f"--pool={args.pool}",
            f"--concurrency={args.concurrency}",
            f"--queues={args.queues or settings.queue}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


def keys_create(args: argparse.Namespace) -> int:
    from domain.keys import create_key
    from domain.store.db import get_database

    settings = _ready_database()
    with get_database(settings.database_url).session() as session:
        key, token = create_key(session, name=args.name, admin=args.admin)
    kind = "admin key" if args.admin else "key"
    print(f"created {kind} {key.id} ({key.key_prefix}...); it is shown only now:", file=sys.stderr)
    print(token)
    return 0


def keys_list(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from domain.store.db import get_database
    from domain.store.tables import ApiKey

    del args
    settings = _ready_database()
    with get_database(settings.database_url).session() as session:
        print("id\tprefix\tadmin\tcreated\trevoked\tname")
        for k in session.scalars(select(ApiKey).order_by(ApiKey.id)):
            print(
                f"{k.id}\t{k.key_prefix}...\t{k.is_admin}\t{k.created_at:%Y-%m-%d %H:%M}\t"
                f"{k.revoked_at or ''}\t{k.name}"
            )
    return 0


def keys_revoke(args: argparse.Namespace) -> int:
    from domain.store.db import get_database, utcnow
    from domain.store.tables import ApiKey

    settings = _ready_database()
    with get_database(settings.database_url).session() as session:
        key = session.get(ApiKey, args.id)
        if key is None:
            raise ValueError(f"no key with id {args.id}")
        key.revoked_at = key.revoked_at or utcnow()
        session.commit()
    print(f"revoked key {args.id}", file=sys.stderr)
    return 0


def keys_rotate_signing(args: argparse.Namespace) -> int:
    """A new Ed25519 signing key; running API and worker processes sign with it from their
    next certificate; certificates signed before still verify with the kept public key."""
    from domain.config import get_settings
    from domain.trust import signing

    del args
    old, new = signing.rotate_signing_key(get_settings())
    print(f"signing key rotated: {old} -> {new} (the old public key stays published)")
    return 0


def db_upgrade(args: argparse.Namespace) -> int:
    from domain.config import get_settings
    from domain.store import migrate

    migrate.upgrade(get_settings().database_url, args.revision)
    print(f"database at {migrate.current(get_settings().database_url)}", file=sys.stderr)
    return 0


def db_downgrade(args: argparse.Namespace) -> int:
    from domain.config import get_settings
    from domain.store import migrate

    migrate.downgrade(get_settings().database_url, args.revision)
    print(f"database at {migrate.current(get_settings().database_url) or 'base'}", file=sys.stderr)
    return 0


def db_current(args: argparse.Namespace) -> int:
    from domain.config import get_settings
    from domain.store import migrate

    del args
    print(migrate.current(get_settings().database_url) or "base")
    return 0


def _metrics_folder(pool: str) -> None:
    """Prefork children count in prometheus_client's multiprocess mode: a private folder unless
    PROMETHEUS_MULTIPROC_DIR names one."""
    import os
    import tempfile

    if pool == "prefork" and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="dmae-metrics-")


def _serve_metrics(port: int, host: str) -> None:
    """This worker's metrics (all its processes') over HTTP, from a daemon thread."""
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    from domain.metrics import multiprocess_dir

    registry = REGISTRY
    if (folder := multiprocess_dir()) is not None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=folder)
    start_http_server(port, addr=host, registry=registry)
    logging.getLogger("dmae.worker").info("metrics on http://%s:%d/metrics", host, port)
