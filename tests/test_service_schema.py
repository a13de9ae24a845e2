"""Schemathesis against the service's own OpenAPI schema: requests generated from every
operation's declared parameters and bodies (valid and invalid), sent to the app in-process with
an admin key (so every route is reachable). Not one may be answered with a 5xx.

The run is bounded (a fixed number of examples per operation, derandomised so CI is
repeatable); jobs are stored but not run (the dispatcher only records them).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from service_support import make_checkpoint, serve_process, service_settings
from test_service_embedded import Recorder, Service

from cli.asgi import create_app

EXAMPLES_PER_OPERATION = 40
# No 5xx, and every answer is one the schema documents: its status, content type and body.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
SEEN: Counter[int] = Counter()
KEY: dict[str, str] = {}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    data = tmp_path_factory.mktemp("schema") / "data"
    checkpoint = make_checkpoint(data / "checkpoints" / "tiny.safetensors")
    app = create_app(
        service_settings(data, rate_limit_requests=0, max_active_jobs=0), dispatcher=Recorder()
    )
    with TestClient(app) as client:
        svc = Service(client, app, checkpoint)
        assert svc.register().status_code == 201
        KEY["admin"] = svc.admin
        yield app
    print(f"\nschemathesis: {sum(SEEN.values())} requests, statuses {dict(sorted(SEEN.items()))}")


def test_no_server_errors(api: Any) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", api)
    failures: list[str] = []
    operations = 0
    for result, mode in itertools.product(
        schema.get_all_operations(), (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    ):
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
        )
        def run(case: Any) -> None:
            response = case.call(headers={"X-API-Key": KEY["admin"]})
            SEEN[response.status_code] += 1
            try:
                case.validate_response(response, checks=CHECKS)
            except (FailureGroup, Exception) as exc:  # collected: every operation is exercised
                failures.append(f"{case.method} {case.path}: {exc}"[:2000])

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid (e.g. GET /healthz has no inputs)
            assert mode is GenerationMode.NEGATIVE
    assert operations >= 30  # both modes of every operation
    assert not failures, "\n\n".join(failures[:5])


# ------------------------------------------------------- issue 26 item 10: the schema is what
# the server does (405 Allow, no nullable text fields, a working training example, links)


def test_405_names_every_method_of_the_path(api: Any) -> None:
    """RFC 9110 15.5.6: OPTIONS /jobs/{id} answered ``Allow: GET`` though DELETE exists."""
    with TestClient(api) as client:
        for method, path, allow in [
            ("OPTIONS", "/jobs/abc", "DELETE, GET"),
            ("PUT", "/evaluations/abc", "DELETE, GET"),
            ("PATCH", "/admin/training/abc", "DELETE, GET"),
            ("DELETE", "/admin/models", "GET, POST"),
            ("POST", "/healthz", "GET"),
        ]:
            r = client.request(method, path, headers={"X-API-Key": KEY["admin"]})
            assert r.status_code == 405 and r.headers["Allow"] == allow, (method, path, r.text)
            assert allow in r.json()["detail"]


def test_optional_text_fields_are_not_nullable(api: Any) -> None:
    """A form, query or header has no null: an optional field declared ``anyOf [x, null]`` made
    generated clients send the text "null" (time_budget_s, model, seed of POST /certify)."""
    schema = api.openapi()
    nullable = []
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            fields = [(p["name"], p["schema"]) for p in op.get("parameters", [])]
            for media, body in op.get("requestBody", {}).get("content", {}).items():
                if media == "multipart/form-data":
                    ref = body["schema"]["$ref"].rsplit("/", 1)[-1]
                    fields += list(schema["components"]["schemas"][ref]["properties"].items())
            nullable += [f"{method} {path} {n}" for n, f in fields if "null" in str(f)]
    assert nullable == []
    assert "model" in schema["components"]["schemas"]["Body_certify"]["properties"]


def test_creating_posts_link_to_what_they_create(api: Any) -> None:
    paths = api.openapi()["paths"]
    for source, status, linked in [
        ("/certify", "202", {"get_job", "cancel_job", "replay_job"}),
        ("/evaluations", "202", {"get_evaluation", "evaluation_results", "cancel_evaluation"}),
        ("/admin/training", "202", {"get_training", "cancel_training"}),
    ]:
        links = paths[source]["post"]["responses"][status]["links"]
        assert linked <= set(links), source
        assert all("$response.body#/id" in str(v["parameters"]) for v in links.values())


def test_training_example_runs_on_the_embedded_default(tmp_path: Path) -> None:
    """The documented example named init 'digits-pretrain', which the default does not have."""
    data = tmp_path / "data"
    app = create_app(service_settings(data, register_bundled=True), dispatcher=Recorder())
    with TestClient(app) as client:
        svc = Service(client, app, make_checkpoint(data / "checkpoints" / "tiny.safetensors"))
        example = app.openapi()["paths"]["/admin/training"]["post"]["requestBody"]["content"][
            "application/json"
        ]["example"]
        r = client.post("/admin/training", json=example, headers={"X-API-Key": svc.admin})
        assert r.status_code == 202, r.text


def test_schemathesis_all_checks_against_a_live_server(tmp_path: Path) -> None:
    """``schemathesis run --checks all`` with its stateful phase against ``dmae-certify serve``
    on the embedded default (bundled models, SQLite, jobs run in the process), bounded by
    examples and time (about a minute). tests/schemathesis.toml says which 422s are allowed."""
    env = {**os.environ, "DMAE_DATA_DIR": str(tmp_path / "data"), "DMAE_DEVICE": "cpu",
           "DMAE_RATE_LIMIT_REQUESTS": "0", "DMAE_RUNNER_THREADS": "1"}  # fmt: skip
    for k in ("DMAE_DATABASE_URL", "DMAE_BROKER_URL"):
        env.pop(k, None)
    cli = str(Path(sys.executable).parent / "dmae-certify")
    keys = subprocess.run([cli, "keys", "create", "--admin", "--name", "st"], env=env,
                          capture_output=True, text=True, cwd=tmp_path, check=True)  # fmt: skip
    admin = keys.stdout.strip().splitlines()[-1]
    config = Path(__file__).with_name("schemathesis.toml")
    with serve_process(tmp_path, env) as (base, log):
        run = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config),
             "run", f"{base}/openapi.json", "-H", f"X-API-Key: {admin}", "--checks", "all",
             "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", "5",
             "--max-time", "45", "--workers", "1", "--seed", "1", "--no-shrink",
             "--request-timeout", "60"],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
        )  # fmt: skip
    summary = run.stdout[-6000:]
    assert run.returncode == 0, summary + log.read_text()[-2000:]
    assert "Stateful" in summary and " passed" in summary
