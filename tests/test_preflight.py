"""Issue 32 item 3: ``make test`` says what it needs before anything runs.

It needs PostgreSQL (an admin URL; database ``test`` by default) and Redis (db 13 by default),
pointed elsewhere by ``DMAE_TEST_POSTGRES`` and ``DMAE_TEST_REDIS``; without them the suite
used to fail deep inside the service tests.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
from preflight import PG_ADMIN_URL, REDIS_URL
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def preflight(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "tests" / "preflight.py")],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_what_is_missing_is_one_sentence_naming_the_servers_and_variables() -> None:
    port = closed_port()
    pg = f"postgresql+psycopg://postgres@127.0.0.1:{port}/test"
    redis = f"redis://127.0.0.1:{port}/13"
    done = preflight(DMAE_TEST_POSTGRES=pg, DMAE_TEST_REDIS=redis)
    assert done.returncode == 1 and done.stdout == ""
    sentence = done.stderr.strip()
    assert "\n" not in sentence and sentence.endswith(".") and sentence.count(": start") == 1
    assert sentence.startswith(
        f"The tests need PostgreSQL at postgresql://postgres@127.0.0.1:{port}/test"
    )
    assert f"Redis at {redis} (DMAE_TEST_REDIS), which does not answer" in sentence
    assert "DMAE_TEST_POSTGRES" in sentence and "Traceback" not in done.stderr
    only_redis = preflight(DMAE_TEST_POSTGRES=PG_ADMIN_URL, DMAE_TEST_REDIS=redis).stderr
    assert "PostgreSQL" not in only_redis.split(":", 1)[0] and "start it" in only_redis


def test_passwords_in_the_urls_are_not_printed() -> None:
    port = closed_port()
    pg = f"postgresql+psycopg://postgres:pg-s3cret@127.0.0.1:{port}/test"
    redis = f"redis://:redis-s3cret@127.0.0.1:{port}/13"
    done = preflight(DMAE_TEST_POSTGRES=pg, DMAE_TEST_REDIS=redis)
    assert done.returncode == 1
    assert "s3cret" not in done.stderr + done.stdout
    assert f"Redis at redis://:***@127.0.0.1:{port}/13 (DMAE_TEST_REDIS)" in done.stderr
    assert f"PostgreSQL at postgresql://postgres:***@127.0.0.1:{port}/test" in done.stderr


def test_the_database_is_created_when_the_server_answers_without_it() -> None:
    name = f"dmae_preflight_{uuid.uuid4().hex[:10]}"
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    admin = make_url(PG_ADMIN_URL).set(drivername="postgresql", database="postgres")
    try:
        done = preflight(DMAE_TEST_POSTGRES=url, DMAE_TEST_REDIS=REDIS_URL)
        assert done.returncode == 0, done.stderr
        assert f"created the test database {name!r}" in done.stderr
        with psycopg.connect(url.replace("+psycopg", "")) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,)
        again = preflight(DMAE_TEST_POSTGRES=url, DMAE_TEST_REDIS=REDIS_URL)
        assert again.returncode == 0 and again.stderr == ""
    finally:
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_make_test_runs_the_check_first_and_the_readme_says_what_it_needs() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "\ntest: services lint typecheck pytest\n" in makefile
    assert "tests/preflight.py" in makefile
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for needed in ("DMAE_TEST_POSTGRES", "DMAE_TEST_REDIS", "database `test`", "db 13"):
        assert needed in readme
