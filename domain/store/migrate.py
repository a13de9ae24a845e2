"""Run the Alembic migrations in ``migrations/`` against a database URL, from any directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config

import migrations

if TYPE_CHECKING:
    from domain.config import Settings

SCRIPT_LOCATION = Path(migrations.__file__).parent


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` up to ``revision`` (default: the latest)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "-1") -> None:
    """Step the schema at ``url`` down to ``revision`` (``base`` removes every table)."""
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    """The revision the database is at (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    from domain.store.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


class SchemaNotReady(RuntimeError):
    """The database is not at the schema this code needs (run ``dmae-certify db upgrade``)."""


def prepare_database(settings: Settings) -> None:
    """SQLite is migrated automatically; other databases must already be at the latest schema
    (``dmae-certify db upgrade``, the compose migration step): else :class:`SchemaNotReady`."""
    from alembic.script import ScriptDirectory

    if settings.is_sqlite:
        upgrade(settings.database_url)
        return
    head = ScriptDirectory.from_config(alembic_config(settings.database_url)).get_current_head()
    at = current(settings.database_url)
    if at != head:
        raise SchemaNotReady(
            f"database schema is at {at or 'nothing'}, the service needs {head}: run "
            "`dmae-certify db upgrade`"
        )
