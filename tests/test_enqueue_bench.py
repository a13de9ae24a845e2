"""``bench/http/enqueue_bench.py`` in CI size: the service and its floor (or, with ``--against``,
another checkout's service) both answer every request, and the JSON carries the figures
docs/PERFORMANCE.md reports. No timing assertions: the ratios are read from the benchmark's
output, run on a quiet machine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from service_support import PG_ADMIN_URL, REDIS_URL, redis_keys_cleaned  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parent.parent


BENCH = [sys.executable, "-m", "bench.http.enqueue_bench"]
SMALL = ["--client", "httpx", "--rounds", "1", "--clients", "4", "--per-client", "3",
         "--polls", "2", "--database", PG_ADMIN_URL, "--broker", REDIS_URL]  # fmt: skip


@pytest.mark.parametrize(
    ("against", "other"), [([], "floor"), (["--against", str(ROOT)], "baseline")]
)
@pytest.mark.usefixtures("redis_keys_cleaned")
def test_enqueue_benchmark_runs_both_cases(tmp_path: Path, against: list[str], other: str) -> None:
    out = tmp_path / "enqueue.json"
    cmd = BENCH + SMALL + against + ["--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert f"service/{other} requests/s: POST median" in run.stdout, run.stdout
    body = json.loads(out.read_text())
    assert body["summary"]["against"] == (against[-1] if against else "floor")
    for case in ("service", "floor"):
        (only,) = body["rounds"][case]
        assert only["errors"] == {}, only  # every upload 202, every poll 200
        assert only["post_rps"] > 0 and only["get_rps"] > 0
        assert 0 < only["post_p50"] <= only["post_p99"]
        if case == "service" or against:  # its 12 jobs ended after the round, none before
            assert only["drained"] == 12, only
    assert body["summary"]["post_rps_ratio"]["median"] > 0


def test_against_a_folder_that_is_no_checkout_is_refused(tmp_path: Path) -> None:
    """Otherwise the service would be compared with itself without a word (the CLI would find
    this checkout's code)."""
    run = subprocess.run(BENCH + ["--against", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "not a dmae-certify checkout" in run.stderr, run.stderr


def test_against_a_checkout_with_other_migrations_is_refused(tmp_path: Path) -> None:
    """Both services share one database: an older checkout would refuse its schema at start."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.py").write_text("")
    shutil.copytree(ROOT / "migrations", tmp_path / "migrations")
    newest = sorted((tmp_path / "migrations" / "versions").glob("0*.py"))[-1]
    newest.unlink()
    run = subprocess.run(BENCH + ["--against", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "compare commits with the same migrations" in run.stderr, (
        run.stderr
    )


@pytest.mark.usefixtures("redis_keys_cleaned")
def test_the_steps_of_a_submission_are_each_timed_once_per_request(tmp_path: Path) -> None:
    """``bench/http/enqueue_steps.py`` in CI size: every step it lists ran once per submission
    (a step renamed or moved would show 0 calls), the parts of ``submit`` add up to no more
    than ``submit``, and the listed steps to no more than the process's CPU."""
    out = tmp_path / "steps.json"
    cmd = [sys.executable, "-m", "bench.http.enqueue_steps", "--client", "httpx",
           "--clients", "3", "--per-client", "4", "--database", PG_ADMIN_URL,
           "--broker", REDIS_URL, "--json", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "CPU per submission" in run.stdout, run.stdout
    body = json.loads(out.read_text())
    assert body["requests"] == 12 and body["errors"] == {}
    steps = {s["step"]: s for s in body["steps"]}
    for name, step in steps.items():
        if not name.startswith("enqueued_at marks"):  # a thread of its own, every 50 ms
            assert step["calls"] == 1.0, (name, step)
        assert step["cpu_ms"] >= 0
    parts = sum(s["cpu_ms"] for s in body["steps"] if s["part_of_submit"])
    assert 0 < parts <= steps["submit (all of it)"]["cpu_ms"] + 1e-9
    top = sum(s["cpu_ms"] for s in body["steps"] if not s["part_of_submit"])
    assert top + body["rest_ms"] == pytest.approx(body["cpu_ms"])


def test_a_run_that_may_exhaust_postgresqls_connections_is_warned_about() -> None:
    """Two API processes of 40 threads and the floor's pool of 40 may need more than the
    default max_connections of 100 leaves: the script says so before it starts (a new user's
    run otherwise failed mid-way with 'too many clients')."""
    from bench.http import enqueue_bench

    needed = enqueue_bench.connections_needed(2, 1, 40, against=False)
    assert needed == 2 * 42 + 40 + 2
    warning = enqueue_bench.connection_warning(needed, 100, 3, 5)
    assert "up to 126 PostgreSQL connections" in warning and "92 left" in warning
    few = enqueue_bench.connections_needed(2, 1, 4, against=False)  # DMAE_API_THREADS=4
    assert enqueue_bench.connection_warning(few, 100, 3, 5) == ""
    assert enqueue_bench.connections_needed(2, 2, 4, against=True) == 4 * 6 + 2
