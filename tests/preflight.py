"""What the test suite needs from outside, checked before it runs (``make test`` calls this first).

The service tests use a real PostgreSQL server (an admin URL whose database they create their
own databases from; default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``) and a real
Redis database (default ``redis://127.0.0.1:6379/13``). ``DMAE_TEST_POSTGRES`` and
``DMAE_TEST_REDIS`` point them elsewhere. When the PostgreSQL server answers but the database
does not exist, it is created. Otherwise one sentence says what is missing, exit status 1.

Run: ``python tests/preflight.py``.
"""

from __future__ import annotations

import os
import sys
from urllib.parse import urlsplit, urlunsplit

PG_ADMIN_URL = os.environ.get(
    "DMAE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("DMAE_TEST_REDIS", "redis://127.0.0.1:6379/13")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_postgres(url: str = PG_ADMIN_URL) -> str | None:
    """None when ``url``'s server answers and its database exists (created here if the server
    answers without it); else what is wrong, as a clause."""
    import psycopg
    from sqlalchemy.engine import make_url

    target = make_url(url).set(drivername="postgresql")
    shown = target.render_as_string(hide_password=True)
    try:
        psycopg.connect(target.render_as_string(hide_password=False), connect_timeout=5).close()
        return None
    except psycopg.OperationalError as exc:
        reason = _first_line(exc)
        if "does not exist" not in reason or not target.database:
            return f"PostgreSQL at {shown} (DMAE_TEST_POSTGRES), which does not answer ({reason})"
    server = target.set(database="postgres").render_as_string(hide_password=False)
    try:
        with psycopg.connect(server, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{target.database}"')
    except psycopg.Error as exc:
        return (
            f"PostgreSQL at {shown} (DMAE_TEST_POSTGRES), which has no database "
            f"{target.database!r} and could not create it ({_first_line(exc)})"
        )
    print(f"created the test database {target.database!r} on {shown}", file=sys.stderr)
    return None


def shown_redis_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, as the PostgreSQL URL is shown:
    the sentence ends up in terminals and CI logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def check_redis(url: str = REDIS_URL) -> str | None:
    """None when Redis at ``url`` answers; else what is wrong, as a clause."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        return (
            f"Redis at {shown_redis_url(url)} (DMAE_TEST_REDIS), which does not answer "
            f"({_first_line(exc)})"
        )
    finally:
        client.close()
    return None


def missing() -> str | None:
    """One sentence naming what the tests need and do not have; None when all is there."""
    problems = [p for p in (check_postgres(), check_redis()) if p is not None]
    if not problems:
        return None
    them = "them" if len(problems) > 1 else "it"
    return (
        f"The tests need {', and '.join(problems)}: start {them} (.ci/run starts both) or "
        "point DMAE_TEST_POSTGRES / DMAE_TEST_REDIS at servers that answer."
    )


def main() -> int:
    sentence = missing()
    if sentence is None:
        return 0
    print(sentence, file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
