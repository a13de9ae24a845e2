"""GET /metrics on the embedded default, its admin lock, multiprocess aggregation, and the job
event log lines (text and JSON)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from service_support import digit_png, service_settings, tiny_checkpoint  # noqa: F401
from test_service_embedded import Service, service  # noqa: F401 - service is a fixture

from cli.asgi import create_app


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(values: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in values.items() if n == name and set(labels.items()) <= set(ls))


def test_metrics_after_one_certificate(service: Service) -> None:  # noqa: F811
    before = samples(service.client.get("/metrics").text)
    r = service.submit(service.alice, digit_png(3))
    assert r.status_code == 202, r.text
    job = service.wait(service.alice, r.json()["url"])
    assert job["status"] == "succeeded"
    page = service.client.get("/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    after = samples(page.text)

    def grew(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert grew("dmae_jobs_total", mode="certify", status="queued") == 1
    assert grew("dmae_jobs_total", mode="certify", status="running") == 1
    assert grew("dmae_jobs_total", mode="certify", status="succeeded") == 1
    assert grew("dmae_samples_total", model="tiny-s0.25", device="cpu") == 220  # n0 + n
    assert grew("dmae_job_duration_seconds_count", mode="certify", phase="queue_wait") == 1
    assert grew("dmae_job_duration_seconds_count", mode="certify", phase="run") == 1
    assert grew("dmae_batch_fill_ratio_count") >= 1
    assert total(after, "dmae_model_load_seconds_count") >= 1
    assert total(after, "dmae_queue_depth", queue="jobs") == 0
    # HTTP latency by route template and status.
    assert total(after, "dmae_http_request_duration_seconds_count", handler="/certify") >= 1
    assert any(
        n == "dmae_http_request_duration_seconds_count" and ("status", "202") in ls
        for n, ls in after
    )


def test_metrics_can_require_the_admin_key(tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    app = create_app(service_settings(tmp_path / "data", metrics_require_admin=True))
    with TestClient(app) as client:
        svc = Service(client, app, tiny_checkpoint)
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=svc.h(svc.alice)).status_code == 403
        ok = client.get("/metrics", headers=svc.h(svc.admin))
        assert ok.status_code == 200 and "dmae_jobs_total" in ok.text


def test_multiprocess_folder_adds_up_every_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes (as Celery prefork children) write to one folder; render() sums them."""
    folder = tmp_path / "prom"
    folder.mkdir()
    code = (
        "from domain import metrics; "
        "metrics.SAMPLES.labels(model='m', device='cpu').inc(5); "
        "metrics.JOBS.labels(mode='certify', status='succeeded').inc()"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(folder))
    from domain import metrics

    values = samples(metrics.render().decode())
    assert total(values, "dmae_samples_total", model="m") == 10
    assert total(values, "dmae_jobs_total", status="succeeded") == 2


def test_job_events_as_text_and_json_lines(monkeypatch: pytest.MonkeyPatch, capfd) -> None:  # type: ignore[no-untyped-def]
    from cli.service import _logging
    from domain import events
    from domain.config import get_settings

    facts = events.JobFacts("certify", "digits-s0.25")
    for fmt in ("text", "json"):
        monkeypatch.setenv("DMAE_LOG_FORMAT", fmt)
        get_settings.cache_clear()
        try:
            _logging("info")
            events.job_changed("job-1", "succeeded", facts, run_s=1.5)
        finally:
            get_settings.cache_clear()
            logging.basicConfig(handlers=[logging.NullHandler()], force=True)
        line = capfd.readouterr().err.strip().splitlines()[-1]
        if fmt == "text":
            assert "job job-1 succeeded" in line and "model=digits-s0.25" in line
            assert "mode=certify" in line and "run_s=1.5" in line
        else:
            record = json.loads(line)
            assert record["job_id"] == "job-1" and record["status"] == "succeeded"
            assert record["model"] == "digits-s0.25" and record["mode"] == "certify"
            assert record["run_s"] == 1.5
