"""Database engine and sessions (SQLAlchemy 2), one engine per URL per process.

SQLite (the embedded default) gets WAL journalling and a busy timeout so the API threads and the
in-process runner can write concurrently. On Postgres a pooled connection that sat idle for
``IDLE_PING_S`` or longer is pinged before it is handed out (and replaced if the ping fails), so
a restarted server is reconnected transparently; one in steady use is not, which saves a round
trip per request under load (a server restart then fails the requests in flight, as 503, and the
first failure renews the whole pool). Timestamps are naive UTC throughout (:func:`utcnow`).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

POOL_SIZE = 20
MAX_OVERFLOW = 20
IDLE_PING_S = 1.0


def utcnow() -> dt.datetime:
    """Current time, naive UTC (the form every timestamp column stores)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; creates the folder of a SQLite file if needed."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # Up to 40 connections: one per thread of the thread pool running the API's sync endpoints
    # (AnyIO's default 40), so no request waits for a connection another holds.
    # LIFO: the connection returned last is handed out next, so under a steady load the same few
    # stay busy (and unpinged) and the rest sit idle.
    engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_use_lifo=True)
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """Ping a connection on checkout when it was idle ``IDLE_PING_S`` or longer (SQLAlchemy's
    ``pool_pre_ping`` pings every checkout); a failed ping makes the pool connect afresh."""

    @event.listens_for(engine, "connect")
    @event.listens_for(engine, "checkin")
    def _idle_from_now(_dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _check(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("idle_since", 0.0) < IDLE_PING_S:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # the driver's error for a dead connection
            raise DisconnectionError(f"pooled connection is dead: {exc}") from exc
        if not alive:
            raise DisconnectionError("pooled connection is dead")


class Database:
    """An engine and its session factory."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that rolls back on error and always closes."""
        with self.sessions() as s:
            try:
                yield s
            except BaseException:
                s.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()


_databases: dict[str, Database] = {}
_lock = threading.Lock()


def get_database(url: str) -> Database:
    """The process-wide :class:`Database` for ``url`` (created on first use)."""
    with _lock:
        db = _databases.get(url)
        if db is None:
            db = _databases[url] = Database(url)
        return db


def reset_after_fork() -> None:
    """Drop pooled connections inherited from a parent process (call in a forked child)."""
    with _lock:
        for db in _databases.values():
            db.engine.dispose(close=False)
