"""A client generated from the served /openapi.json by a generator nobody here wrote
(openapi-python-client, the dev extra) works against a real `dmae-certify serve`: it uploads a
checkpoint and a digit, polls the job, reads the parsed certificate, and parses error answers
into the declared error models. Also: the start-up log shows the real address.
"""

from __future__ import annotations

import importlib
import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from PIL import Image
from service_support import (
    SIGMA,
    assert_same_certificate,
    digit_png,
    make_checkpoint,
    reference,
    serve_process,
)

BIN = Path(sys.executable).parent
PACKAGE = "dmae_certify_client"
KEY_LINE = re.compile(r"created an admin key \(shown once\): (\S+) .* (http://\S+/certify)")


@dataclass
class Server:
    base: str
    admin: str
    log: str
    checkpoint: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`dmae-certify serve` on a free port, fresh data folder, no bundled models."""
    root = tmp_path_factory.mktemp("generated-client")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMAE_")}
    env.update(
        DMAE_DATA_DIR=str(root / "data"),
        DMAE_REGISTER_BUNDLED="false",
        DMAE_DEVICE="cpu",
        DMAE_BATCH_SIZE="64",
    )
    with serve_process(root, env) as (base, log_path):
        text = log_path.read_text()
        found = KEY_LINE.search(text)
        assert found, text
        checkpoint = make_checkpoint(root / "tiny.safetensors")
        yield Server(base, found.group(1), text, checkpoint)


@pytest.fixture(scope="module")
def client_package(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The package openapi-python-client generates from the server's /openapi.json."""
    out = tmp_path_factory.mktemp("generated")
    config = out / "config.yaml"
    # No formatting pass (faster, and ruff may be absent); PNG answers (input.png, noisy.png)
    # read as files, the generator's documented way for binary types it does not know.
    config.write_text(
        "post_hooks: []\ncontent_type_overrides:\n  image/png: application/octet-stream\n"
    )
    run = subprocess.run(
        [
            str(BIN / "openapi-python-client"),
            "generate",
            "--url",
            f"{server.base}/openapi.json",
            "--output-path",
            str(out / PACKAGE),
            "--meta",
            "none",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    # A warning means a part of the schema the generator could not turn into code.
    assert "Warning" not in run.stdout + run.stderr, run.stdout + run.stderr
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def _api(operation: str) -> ModuleType:
    """The generated module of one operation, e.g. ``certification.certify``."""
    return importlib.import_module(f"{PACKAGE}.api.{operation}")


def test_start_up_log_shows_the_real_address(server: Server) -> None:
    found = KEY_LINE.search(server.log)
    assert found is not None
    assert found.group(2) == f"{server.base}/certify"
    assert "HOST:PORT" not in server.log


def test_generated_client_uploads_polls_and_parses(server: Server, client_package: Any) -> None:
    from dmae_certify_client import AuthenticatedClient
    from dmae_certify_client.models import (
        BodyCertify,
        BodyRegisterModel,
        ErrorOut,
        JobOut,
        ModelOut,
        ValidationErrorOut,
    )
    from dmae_certify_client.types import File

    client = AuthenticatedClient(
        base_url=server.base, token=server.admin, auth_header_name="X-API-Key", prefix=""
    )
    raw = httpx.Client(base_url=server.base, headers={"X-API-Key": server.admin}, timeout=120)
    with client, raw:
        # A checkpoint upload (the `file` field) ...
        ckpt = File(payload=io.BytesIO(server.checkpoint.read_bytes()), file_name="tiny.bin")
        r = _api("admin.register_model").sync_detailed(
            client=client, body=BodyRegisterModel(file=ckpt, name="tiny-s0.25", default=True)
        )
        assert r.status_code == 201, r.content
        assert isinstance(r.parsed, ModelOut) and r.parsed.sigma == SIGMA and r.parsed.default

        # ... and an image upload (the `image` field).
        png = digit_png(7)
        form = {"sigma": SIGMA, "n0": 20, "n": 300, "seed": 42}
        r = _api("certification.certify").sync_detailed(
            client=client,
            body=BodyCertify(image=File(payload=io.BytesIO(png), file_name="7.png"), **form),
        )
        assert r.status_code == 202, r.content
        assert isinstance(r.parsed, JobOut)
        job_id = r.parsed.id

        deadline = time.monotonic() + 300
        while (job := _api("certification.get_job").sync(client=client, job_id=job_id)).status in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        assert isinstance(job, JobOut) and job.status == "succeeded", job

        served = raw.get(f"/jobs/{job_id}").json()
        cert = job.certificate
        assert cert.radius == served["certificate"]["radius"]
        assert job.to_dict() == served  # nothing lost or altered by the generated parser
        # Every field the stored certificate has is declared in the schema, timings included.
        assert cert.additional_properties == {}, sorted(cert.additional_properties)
        assert cert.timings.additional_properties == {}, sorted(cert.timings.additional_properties)
        assert cert.weights_sha256 == served["certificate"]["weights_sha256"] != ""
        want = reference(
            server.checkpoint, png, sigma=SIGMA, alpha=0.001, n0=20, n=300, seed=42, batch_size=64
        )
        assert_same_certificate(served["certificate"], want)

        # What the model sees: PNG answers come back as files.
        strip = _api("certification.job_noisy_png").sync(client=client, job_id=job_id, k=2)
        assert isinstance(strip, File)
        assert Image.open(strip.payload).size == (2 * 8 + 1, 8)

        # The same submission again: 200 with the stored job, parsed as a job too.
        r = _api("certification.certify").sync_detailed(
            client=client,
            body=BodyCertify(image=File(payload=io.BytesIO(png), file_name="7.png"), **form),
        )
        assert r.status_code == 200 and isinstance(r.parsed, JobOut), r.content
        assert r.parsed.id == job_id and r.parsed.certificate.radius == cert.radius

        # Errors parse into the declared models.
        r = _api("certification.list_jobs").sync_detailed(client=client, limit=-1)
        assert r.status_code == 422 and isinstance(r.parsed, ValidationErrorOut), r.content
        assert "limit" in r.parsed.detail
        assert [e.loc for e in r.parsed.errors] == [["query", "limit"]]

        r = _api("certification.certify").sync_detailed(
            client=client,
            body=BodyCertify(image=File(payload=io.BytesIO(png), file_name="7.png"), sigma=0.9),
        )
        assert r.status_code == 422 and isinstance(r.parsed, ValidationErrorOut), r.content
        assert "0.9" in r.parsed.detail

        r = _api("certification.get_job").sync_detailed(client=client, job_id="no-such-job")
        assert r.status_code == 404 and isinstance(r.parsed, ErrorOut), r.content
        assert r.parsed.detail == "job 'no-such-job' not found"

        stranger = AuthenticatedClient(
            base_url=server.base, token="dmae_wrong", auth_header_name="X-API-Key", prefix=""
        )
        with stranger:
            r = _api("models.list_models").sync_detailed(client=stranger)
        assert r.status_code == 401 and isinstance(r.parsed, ErrorOut), r.content


def test_generated_client_runs_an_evaluation(server: Server, client_package: Any) -> None:
    """An evaluation through the generated client: every field served is declared (nothing
    lands in additional_properties) and parses back to exactly what the server sent."""
    from dmae_certify_client import AuthenticatedClient
    from dmae_certify_client.models import BodyCreateEvaluation, EvaluationOut

    client = AuthenticatedClient(
        base_url=server.base, token=server.admin, auth_header_name="X-API-Key", prefix=""
    )
    raw = httpx.Client(base_url=server.base, headers={"X-API-Key": server.admin}, timeout=120)
    with client, raw:
        with open(server.checkpoint, "rb") as f:  # registered by the test above, or here
            r = raw.post("/admin/models", files={"file": f}, data={"name": "tiny-s0.25"})
        assert r.status_code in (201, 409), r.text
        body = BodyCreateEvaluation(dataset="digits:test", model="tiny-s0.25", n=200, n0=20, max_=3)
        r = _api("evaluations.create_evaluation").sync_detailed(client=client, body=body)
        assert r.status_code == 202, r.content
        assert isinstance(r.parsed, EvaluationOut)
        deadline = time.monotonic() + 300
        get = _api("evaluations.get_evaluation")
        while (ev := get.sync(client=client, evaluation_id=r.parsed.id)).status in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline, ev
            time.sleep(0.05)
        assert isinstance(ev, EvaluationOut) and ev.status == "succeeded", ev
        served = raw.get(f"/evaluations/{ev.id}").json()
        assert ev.to_dict() == served
        assert ev.additional_properties == {} and ev.progress.additional_properties == {}
        assert all(point.additional_properties == {} for point in ev.certified_accuracy)
        assert ev.progress.images_done == 3 and ev.max_ == 3
