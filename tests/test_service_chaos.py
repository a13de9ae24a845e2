"""The chaos run (tests/chaos/chaos.py) in reduced form: 30 jobs through the API to a real
Celery worker on Postgres and a private Redis, with one worker SIGKILL and one Redis restart
while they run. Nothing may be lost, duplicated or differ from the clean run's results."""

from __future__ import annotations

from pathlib import Path

from chaos.chaos import ChaosConfig, run_chaos


def test_chaos_reduced(tmp_path: Path) -> None:
    # n=1,000 keeps each job in flight long enough for the kill to land mid-job.
    cfg = ChaosConfig(jobs=30, kills=1, redis_restarts=1, workers=1, n=1000, timeout_s=240)
    report = run_chaos(cfg, tmp_path)
    print("\n" + report.summary())
    assert report.submitted == 30 and report.lost == 0 and report.duplicates == 0
    assert report.missing_certificates == 0 and report.mismatches == []
    assert report.statuses == {"succeeded": 30} and report.compared == 30
    assert report.kills == ["worker"] and report.redis_restarts == 1
    assert report.redelivered >= 1  # the killed worker's job was run again
    assert report.ok
