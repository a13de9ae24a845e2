"""Faults the tests inject for real, on resources they own (never the shared services):

- :class:`PrivateRedis`: a ``redis-server`` on its own loopback port, without persistence, that
  can be killed (SIGKILL) and started again empty, like a crashed broker.
- :class:`BlockableDatabase`: a dedicated Postgres database on the shared server that can be
  made unavailable (``ALLOW_CONNECTIONS false`` + ``pg_terminate_backend``) and back.
- :class:`WorkerProcess`: a ``dmae-certify worker`` (Celery, prefork) subprocess whose pool
  child or whole process group can be SIGKILLed, and restarted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, Any

import psycopg
from service_support import PG_ADMIN_URL
from sqlalchemy.engine import make_url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A throw-away redis-server on 127.0.0.1:<port> (no RDB/AOF: a restart loses everything)."""

    def __init__(self, port: int | None = None, log: Path | None = None):
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> None:
        out: Any = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "yes"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        if out is not subprocess.DEVNULL:
            out.close()
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def ping(self) -> bool:
        import redis

        try:
            client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (redis.exceptions.RedisError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL: the broker vanishes with every message it held."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def _admin() -> psycopg.Connection[Any]:
    url = make_url(PG_ADMIN_URL).set(drivername="postgresql")
    return psycopg.connect(url.render_as_string(hide_password=False), autocommit=True)


class BlockableDatabase:
    """A dedicated, migrated Postgres database that can be taken away and given back."""

    def __init__(self, prefix: str = "dmae_fault") -> None:
        self.name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self.url = (
            make_url(PG_ADMIN_URL).set(database=self.name).render_as_string(hide_password=False)
        )

    def create(self) -> None:
        from domain.store import migrate

        with _admin() as conn:
            conn.execute(f'CREATE DATABASE "{self.name}"')
        migrate.upgrade(self.url)

    def block(self) -> None:
        """Refuse new connections and cut the open ones: the database is 'down'."""
        with _admin() as conn:
            conn.execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (self.name,),
            )

    def unblock(self) -> None:
        with _admin() as conn:
            conn.execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')

    def drop(self) -> None:
        from domain.store.db import _databases

        for url in [u for u in _databases if self.name in u]:
            _databases.pop(url).dispose()
        with _admin() as conn:
            conn.execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def __enter__(self) -> BlockableDatabase:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.drop()


def terminate(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM ``proc`` and wait; SIGKILL it if it has not exited within ``timeout`` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


class WorkerProcess:
    """``dmae-certify worker --pool prefork --concurrency 1`` in its own process group."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path, concurrency: int = 1):
        self.env, self.cwd, self.log_path = env, cwd, log
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()/kill()
        cli = str(Path(sys.executable).parent / "dmae-certify")
        self.proc = subprocess.Popen(
            [cli, "worker", "--pool", "prefork", "--concurrency", str(self.concurrency),
             "--log-level", "info"],
            env={**os.environ, **self.env}, cwd=self.cwd, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pool_children(self, timeout: float = 300.0) -> list[int]:
        """The pool's child processes (waits until the pool has started them)."""
        deadline = time.monotonic() + timeout
        while True:
            found = children(self.pid)
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.1)

    def kill_child(self) -> int:
        """SIGKILL the pool child running the task: Celery's parent sees the worker lost."""
        pids = self.pool_children()
        if not pids:
            raise RuntimeError("worker has no pool child to kill")
        os.kill(pids[0], signal.SIGKILL)
        return pids[0]

    def kill(self) -> None:
        """SIGKILL the whole worker (parent and pool children): a machine lost."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self._close()

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # any orphaned pool child
        self._close()

    def _close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""
