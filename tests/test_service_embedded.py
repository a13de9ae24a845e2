"""The embedded default end to end: SQLite + in-process runner behind the real FastAPI app.

Certificates must equal what the core computes for the same preprocessed image, model,
parameters and seed; a re-submission returns the stored job instead of drawing new noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_support import (  # noqa: F401 - tiny_checkpoint is a fixture
    SIGMA,
    assert_same_certificate,
    digit_png,
    make_checkpoint,
    reference,
    service_settings,
    tiny_checkpoint,
    wait_for,
)
from sqlalchemy import func, select

from cli.asgi import create_app
from domain.keys import create_key
from domain.store.tables import Certificate

SMALL = {"sigma": str(SIGMA), "n0": "20", "n": "200"}


class Service:
    """A running embedded service with one admin and two client keys."""

    def __init__(self, client: TestClient, app: Any, checkpoint: Path):
        self.client, self.app, self.checkpoint = client, app, checkpoint
        with app.state.db.session() as s:
            self.admin = create_key(s, "admin", admin=True)[1]
            self.alice = create_key(s, "alice")[1]
            self.bob = create_key(s, "bob")[1]

    def h(self, key: str) -> dict[str, str]:
        return {"X-API-Key": key}

    def register(self, path: str = "tiny.safetensors", **form: str) -> Any:
        """Register ``path`` as the default model of its sigma (the tests submit by sigma)."""
        form.setdefault("default", "true")
        return self.client.post(
            "/admin/models", headers=self.h(self.admin), data={"path": path, **form}
        )

    def submit(self, key: str, png: bytes, **form: str) -> Any:
        return self.client.post(
            "/certify", headers=self.h(key), files={"image": ("d.png", png)}, data={**SMALL, **form}
        )

    def wait(self, key: str, url: str, **kw: Any) -> dict[str, Any]:
        return wait_for(self.client.get, url, key, **kw)

    def certificates(self) -> int:
        with self.app.state.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(Certificate)) or 0)


@pytest.fixture
def service(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Service]:  # noqa: F811
    app = create_app(service_settings(tmp_path / "data"))
    with TestClient(app) as client:
        svc = Service(client, app, tiny_checkpoint)
        assert svc.register().status_code == 201
        yield svc


def test_certificate_is_the_cores_and_resubmission_returns_it(service: Service) -> None:
    png = digit_png(0)
    r = service.submit(service.alice, png)
    assert r.status_code == 202, r.text
    queued = r.json()
    assert queued["url"] == f"/jobs/{queued['id']}" and queued["status"] in ("queued", "running")
    job = service.wait(service.alice, queued["url"])
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"done": 220, "total": 220}
    cert = job["certificate"]
    want = reference(
        service.checkpoint,
        png,
        sigma=SIGMA,
        alpha=0.001,
        n0=20,
        n=200,
        seed=job["seed"],
        batch_size=64,
    )
    assert_same_certificate(cert, want)
    assert cert["label"] == (None if cert["prediction"] is None else f"digit-{cert['prediction']}")
    assert cert["model"] == "tiny-s0.25" and cert["input_shape"] == [3, 8, 8]
    assert len(cert["checkpoint_sha256"]) == 64 and len(cert["input_sha256"]) == 64

    again = service.submit(service.alice, png)
    assert again.status_code == 200
    assert again.json()["id"] == job["id"]
    assert again.json()["certificate"] == cert
    # The explicit form of the derived seed is the same pre-committed run, not a new one.
    same_seed = service.submit(service.alice, png, seed=str(job["seed"]))
    assert same_seed.json()["id"] == job["id"]
    assert service.certificates() == 1


def test_predict_and_top2_equal_the_core(service: Service) -> None:
    png = digit_png(5)
    for mode in ("predict", "certify_top2"):
        r = service.submit(service.alice, png, mode=mode, seed="1234")
        assert r.status_code == 202, r.text
        job = service.wait(service.alice, r.json()["url"])
        assert job["status"] == "succeeded", job
        want = reference(
            service.checkpoint,
            png,
            mode=mode,
            sigma=SIGMA,
            alpha=0.001,
            n0=20,
            n=200,
            seed=1234,
            batch_size=64,
        )
        assert_same_certificate(job["certificate"], want)
    assert job["progress"]["total"] == 220


def test_a_different_seed_is_a_different_job(service: Service) -> None:
    png = digit_png(1)
    a = service.submit(service.alice, png, seed="1").json()
    b = service.submit(service.alice, png, seed="2").json()
    assert a["id"] != b["id"] and a["seed"] == 1 and b["seed"] == 2
    # Another client submitting the same image gets its own job, with the same derived seed.
    mine = service.submit(service.alice, png).json()
    theirs = service.submit(service.bob, png).json()
    assert mine["id"] != theirs["id"] and mine["seed"] == theirs["seed"]


def test_concurrent_jobs_share_the_engine_and_keep_their_certificates(
    tmp_path: Path,
    tiny_checkpoint: Path,  # noqa: F811
) -> None:
    """Four runner threads: jobs sampled together in shared batches get the core's answers."""
    app = create_app(service_settings(tmp_path / "data", runner_threads=4))
    with TestClient(app) as client:
        svc = Service(client, app, tiny_checkpoint)
        assert svc.register().status_code == 201
        pngs = [digit_png(i) for i in range(6)]
        urls = [svc.submit(svc.alice, png, n="2000").json()["url"] for png in pngs]
        jobs = [svc.wait(svc.alice, url) for url in urls]
    for png, job in zip(pngs, jobs, strict=True):
        assert job["status"] == "succeeded", job
        want = reference(
            tiny_checkpoint, png, sigma=SIGMA, alpha=0.001, n0=20, n=2000, seed=job["seed"],
            batch_size=64,
        )  # fmt: skip
        assert_same_certificate(job["certificate"], want)


def test_cancel_queued_and_running_jobs(service: Service) -> None:
    png = digit_png(2)
    big = {"n": "100000", "n0": "10"}
    running = service.submit(service.alice, png, **big).json()
    service.wait(service.alice, running["url"], until=("running",))
    queued = service.submit(service.alice, png, seed="7", **big).json()
    assert queued["status"] == "queued"

    r = service.client.delete(queued["url"], headers=service.h(service.alice))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = service.client.delete(running["url"], headers=service.h(service.alice))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"

    # The runner stops the cancelled job and goes on with the next one.
    small = service.submit(service.alice, png, seed="8").json()
    assert service.wait(service.alice, small["url"])["status"] == "succeeded"
    for job in (running, queued):
        final = service.client.get(job["url"], headers=service.h(service.alice)).json()
        assert final["status"] == "cancelled" and final["certificate"] is None
        assert final["progress"]["done"] < final["progress"]["total"]
    assert (
        service.client.get(queued["url"], headers=service.h(service.alice)).json()["attempts"] == 0
    )
    assert service.certificates() == 1
    # A finished job cannot be cancelled; a cancelled one re-submitted runs under the same seed.
    r = service.client.delete(small["url"], headers=service.h(service.alice))
    assert r.status_code == 409 and "already succeeded" in r.json()["detail"]
    retry = service.submit(service.alice, png, seed="7", **{"n": "200", "n0": "20"})
    assert retry.status_code == 202
    again = service.submit(service.alice, png, seed="7", **big)
    assert again.status_code == 202 and again.json()["id"] == queued["id"]
    service.client.delete(queued["url"], headers=service.h(service.alice))


def test_list_own_jobs_paginated(service: Service) -> None:
    png = digit_png(3)
    ids = [service.submit(service.alice, png, seed=str(s)).json()["id"] for s in range(3)]
    service.submit(service.bob, png)
    page = service.client.get("/jobs?limit=2", headers=service.h(service.alice)).json()
    assert page["total"] == 3 and len(page["items"]) == 2
    rest = service.client.get("/jobs?limit=2&offset=2", headers=service.h(service.alice)).json()
    assert {j["id"] for j in page["items"] + rest["items"]} == set(ids)
    for job_id in ids:
        service.wait(service.alice, f"/jobs/{job_id}")
    done = service.client.get("/jobs?status=succeeded", headers=service.h(service.alice)).json()
    assert done["total"] == 3 and all(j["certificate"] for j in done["items"])


def test_model_choice_and_parameter_errors(service: Service) -> None:
    png = digit_png(0)
    cases = [
        ({"sigma": "0.5"}, "no active model trained for sigma=0.5"),
        ({"model": "nope"}, "unknown model 'nope'"),
        ({"sigma": "-1"}, "sigma must be a positive finite number"),
        ({"sigma": "inf"}, "sigma must be a positive finite number"),
        ({"alpha": "0.7"}, "alpha must lie in [1e-100, 0.5)"),
        ({"n": "0"}, "n must lie in [1, 100000]"),
        ({"n0": "100000"}, "n0 must lie in [1, 10000]"),
        ({"mode": "guess"}, "mode"),
        ({"n": "many"}, "n: Input should be a valid integer"),
    ]
    for form, message in cases:
        r = service.submit(service.alice, png, **form)
        assert r.status_code == 422, (form, r.text)
        assert message in r.json()["detail"], (form, r.json())
    missing = service.client.post("/certify", headers=service.h(service.alice), data=SMALL)
    assert (
        missing.status_code == 422 and "image: this field is required" in missing.json()["detail"]
    )
    # With a model named, sigma defaults to the one it was trained for.
    r = service.client.post(
        "/certify",
        headers=service.h(service.alice),
        files={"image": ("d.png", png)},
        data={"model": "tiny-s0.25", "n": "50", "n0": "10"},
    )
    assert r.status_code == 202 and r.json()["sigma"] == SIGMA
    # A deactivated model is no longer picked.
    assert (
        service.client.post(
            "/admin/models/tiny-s0.25/deactivate", headers=service.h(service.admin)
        ).json()["active"]
        is False
    )
    assert service.client.get("/models", headers=service.h(service.alice)).json() == []
    r = service.submit(service.alice, digit_png(9))
    assert r.status_code == 422 and "no active model" in r.json()["detail"]


def test_models_listing(service: Service) -> None:
    models = service.client.get("/models", headers=service.h(service.alice)).json()
    assert [m["name"] for m in models] == ["tiny-s0.25"]
    m = models[0]
    assert m["sigma"] == SIGMA and m["input_size"] == 8 and m["num_classes"] == 10
    assert m["classes"][3] == "digit-3" and m["licence"] and m["kind"] == "classifier"


def test_job_fails_clearly_when_its_checkpoint_changed(service: Service) -> None:
    """A process loading the model afresh refuses a file that is not the registered one."""
    from worker.model_cache import CACHE

    make_checkpoint(service.checkpoint, bias=0.5)  # same name, different weights
    CACHE.clear()
    r = service.submit(service.alice, digit_png(4))
    job = service.wait(service.alice, r.json()["url"])
    assert job["status"] == "failed" and "changed since it was registered" in job["error"]
    assert job["certificate"] is None


class Recorder:
    """A dispatcher that only remembers what it was given (a broker that lost the messages)."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def certify(self, job_id: str) -> None:
        self.sent.append(job_id)

    def train(self, run_id: str) -> None:
        self.sent.append(run_id)

    def backlog(self) -> int | None:
        return None


def test_queued_jobs_survive_a_restart(tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    settings = service_settings(tmp_path / "data")
    lost = Recorder()
    app = create_app(settings, dispatcher=lost)
    with TestClient(app) as client:
        svc = Service(client, app, tiny_checkpoint)
        svc.register()
        job = svc.submit(svc.alice, digit_png(6)).json()
        assert lost.sent == [job["id"]] and job["status"] == "queued"
        key = svc.alice
    # The next start of the embedded service picks the stored job up and certifies it.
    app = create_app(settings)
    with TestClient(app) as client:
        done = wait_for(client.get, job["url"], key)
        assert done["status"] == "succeeded" and done["attempts"] == 1


def test_bundled_models_are_registered_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.checkpoints

    bundled = tmp_path / "bundled"
    make_checkpoint(bundled / "digits-s0.25.safetensors", name="digits-s0.25")
    monkeypatch.setattr(models.checkpoints, "BUNDLED_DIR", bundled)
    settings = service_settings(tmp_path / "data", register_bundled=True)
    for _ in range(2):  # a restart registers nothing twice
        app = create_app(settings)
        with TestClient(app) as client:
            with app.state.db.session() as s:
                key = create_key(s)[1]
            models_ = client.get("/models", headers={"X-API-Key": key}).json()
            assert [m["name"] for m in models_] == ["digits-s0.25"]
    app = create_app(settings)
    with TestClient(app) as client:
        r = client.post("/certify", headers={"X-API-Key": key},
                        files={"image": ("d.png", digit_png(0))}, data=SMALL)  # fmt: skip
        job = wait_for(client.get, r.json()["url"], key)
        assert job["status"] == "succeeded" and job["certificate"]["model"] == "digits-s0.25"
