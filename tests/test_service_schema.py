"""Schemathesis against the service's own OpenAPI schema: requests generated from every
operation's declared parameters and bodies (valid and invalid), sent to the app in-process with
an admin key (so every route is reachable). Not one may be answered with a 5xx.

The run is bounded (a fixed number of examples per operation, derandomised so CI is
repeatable); jobs are stored but not run (the dispatcher only records them).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
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
from service_support import make_checkpoint, service_settings
from test_service_embedded import Recorder, Service

from app.main import create_app

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
