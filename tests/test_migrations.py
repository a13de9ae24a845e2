"""Alembic migrations up and down on SQLite and Postgres, and in step with domain.store.tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from service_support import database, pg_url  # noqa: F401 - fixtures
from sqlalchemy import inspect

from domain.store import migrate
from domain.store.db import make_engine
from domain.store.tables import Base

TABLES = {
    "api_keys",
    "checkpoints",
    "jobs",
    "job_inputs",
    "certificates",
    "training_runs",
    "idempotency_keys",
    "evaluations",
    "evaluation_items",
    "job_uploads",
}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _differences(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(database: str) -> None:
    head = ScriptDirectory.from_config(migrate.alembic_config(database)).get_current_head()
    migrate.upgrade(database)
    assert migrate.current(database) == head
    assert _tables(database) == TABLES
    assert _differences(database) == []  # the migrations build exactly what the models declare
    migrate.downgrade(database, "base")
    assert migrate.current(database) is None and _tables(database) == set()
    migrate.upgrade(database)
    assert _tables(database) == TABLES and _differences(database) == []


def test_db_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.sqlite3'}"
    env = {**os.environ, "DMAE_DATABASE_URL": url}
    cli = str(Path(sys.executable).parent / "dmae-certify")

    def run(*args: str) -> str:
        out = subprocess.run([cli, *args], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert run("db", "current") == "base"
    run("db", "upgrade")
    assert run("db", "current") == migrate.current(url) != "base"
    head = run("db", "current")
    run("db", "downgrade")  # one step back
    assert run("db", "current") not in (head, "")
    run("db", "downgrade", "--revision", "base")
    assert run("db", "current") == "base" and _tables(url) == set()
