"""/openapi.json tells the truth, and /docs and /redoc work without the internet.

- Every route documents every status it can return (the table below, itself checked against
  each route's dependencies and the statuses its code raises), each error with a body model.
- File upload fields are ``format: binary`` (so generated clients send files).
- 422 bodies are the service's ``{"detail": "<sentence>", "errors": [...]}``, as declared.
- The docs pages reference nothing outside the host, and every asset they load is served.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import File, UploadFile
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from service_support import digit_png, make_checkpoint, service_settings

from app.auth import current_client, get_session, require_admin
from app.routes import (
    admin,
    evaluations,
    health,
    jobs,
    metrics,
    models,
    previews,
    replays,
    signing,
    web,
)
from app.routes.deps import get_dispatcher
from app.schemas import ValidationErrorOut
from cli.asgi import create_app

# What each route can answer: its success status(es), then the errors its dependencies and
# its code raise (401 + 429: an API key is checked and rate-limited; 403: an admin key;
# 404: an id in the path; 400 + 413 + 422: a request body; 415: an image upload; 409: a
# conflict the route checks; 503: the database, or a job handed to the broker).
CAN_RETURN: dict[tuple[str, str], set[int]] = {
    ("POST", "/certify"): {200, 202, 400, 401, 409, 413, 415, 422, 429, 503},
    ("GET", "/jobs"): {200, 401, 422, 429, 503},
    ("GET", "/jobs/{job_id}"): {200, 401, 404, 422, 429, 503},
    ("DELETE", "/jobs/{job_id}"): {200, 401, 404, 409, 429, 503},
    ("POST", "/jobs/{job_id}/replay"): {202, 401, 403, 404, 409, 429, 503},
    ("GET", "/jobs/{job_id}/input.png"): {200, 401, 404, 429, 503},
    ("GET", "/jobs/{job_id}/noisy.png"): {200, 401, 404, 422, 429, 503},
    ("POST", "/evaluations"): {202, 400, 401, 413, 415, 422, 429, 503},
    ("GET", "/evaluations"): {200, 401, 422, 429, 503},
    ("GET", "/evaluations/{evaluation_id}"): {200, 401, 404, 429, 503},
    ("GET", "/evaluations/{evaluation_id}/results.tsv"): {200, 401, 404, 429, 503},
    ("GET", "/evaluations/{evaluation_id}/plot.png"): {200, 401, 404, 409, 429, 503},
    ("DELETE", "/evaluations/{evaluation_id}"): {200, 401, 404, 409, 429, 503},
    ("GET", "/models"): {200, 401, 429, 503},
    ("GET", "/admin/models"): {200, 401, 403, 429, 503},
    ("POST", "/admin/models"): {201, 400, 401, 403, 409, 413, 422, 429, 503},
    ("POST", "/admin/models/{name}/activate"): {200, 401, 403, 404, 429, 503},
    ("POST", "/admin/models/{name}/deactivate"): {200, 401, 403, 404, 429, 503},
    ("POST", "/admin/models/{name}/default"): {200, 401, 403, 404, 422, 429, 503},
    ("POST", "/admin/training"): {202, 400, 401, 403, 409, 413, 422, 429, 503},
    ("GET", "/admin/training"): {200, 401, 403, 422, 429, 503},
    ("GET", "/admin/training/{run_id}"): {200, 401, 403, 404, 429, 503},
    ("DELETE", "/admin/training/{run_id}"): {200, 401, 403, 404, 409, 429, 503},
    ("GET", "/keys"): {200},
    ("GET", "/healthz"): {200},
    ("GET", "/readyz"): {200, 503},
    ("GET", "/metrics"): {200, 401, 403, 503},
}
ERROR_MODEL = {422: "ValidationErrorOut", 503: "UnavailableOut"}  # every other: ErrorOut
NOT_JSON = {"/metrics": "text/plain", "/jobs/{job_id}/input.png": "image/png",
            "/jobs/{job_id}/noisy.png": "image/png",
            "/evaluations/{evaluation_id}/results.tsv": "text/tab-separated-values",
            "/evaluations/{evaluation_id}/plot.png": "image/png"}  # fmt: skip
RAISES = re.compile(r"ServiceError\((\d{3})|(not_found)\(|(bad_input)\(")


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return create_app(service_settings(tmp_path_factory.mktemp("openapi") / "data"))


@pytest.fixture(scope="module")
def schema(app: Any) -> dict[str, Any]:
    with TestClient(app) as client:
        body: dict[str, Any] = client.get("/openapi.json").json()
    return body


def _calls(dependant: Dependant) -> Iterator[Any]:
    for dep in dependant.dependencies:
        yield dep.call
        yield from _calls(dep)


def implied(route: APIRoute) -> set[int]:
    """The error statuses a route's dependencies, parameters and own code imply."""
    calls = set(_calls(route.dependant))
    codes = set()
    if current_client in calls:
        codes |= {401, 429}
    if require_admin in calls:
        codes.add(403)
    if get_session in calls or get_dispatcher in calls:
        codes.add(503)
    if route.dependant.path_params:
        codes.add(404)
    if route.dependant.query_params or route.body_field is not None:
        codes.add(422)
    if route.body_field is not None:
        codes |= {400, 413}
    for status, missing, _bad in RAISES.findall(inspect.getsource(route.endpoint)):
        codes.add(int(status) if status else 404 if missing else 422)
    return codes


def test_the_table_covers_every_operation(schema: dict[str, Any]) -> None:
    operations = {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops}
    assert operations == set(CAN_RETURN)


def test_the_table_has_what_each_routes_code_implies() -> None:
    routes = [
        r
        for module in (
            admin,
            evaluations,
            health,
            jobs,
            metrics,
            models,
            previews,
            replays,
            signing,
            web,
        )  # fmt: skip
        for r in module.router.routes
        if isinstance(r, APIRoute) and r.include_in_schema
    ]
    assert len(routes) == len(CAN_RETURN)
    for route in routes:
        for method in route.methods or ():
            missing = implied(route) - CAN_RETURN[(method, route.path)]
            assert not missing, f"{method} {route.path} can also return {sorted(missing)}"


def test_every_route_documents_every_status_with_a_model(schema: dict[str, Any]) -> None:
    names = schema["components"]["schemas"]
    for (method, path), statuses in CAN_RETURN.items():
        responses = schema["paths"][path][method.lower()]["responses"]
        undocumented = {str(s) for s in statuses} - set(responses)
        assert not undocumented, f"{method} {path} does not document {sorted(undocumented)}"
        for status, answer in responses.items():
            content = answer.get("content", {})
            if int(status) >= 400:
                ref = content["application/json"]["schema"]["$ref"]
                want = ERROR_MODEL.get(int(status), "ErrorOut")
                assert ref == f"#/components/schemas/{want}", (method, path, status, ref)
                assert answer["description"], (method, path, status)
            elif path in NOT_JSON:  # Prometheus text, images
                if NOT_JSON[path] == "image/png":
                    assert set(content) == {"image/png"}, (method, path, content)
                    assert content["image/png"]["schema"]["format"] == "binary"
            else:
                assert content["application/json"]["schema"], (method, path, status)
    assert "HTTPValidationError" not in names and "ValidationError" not in names


def test_resubmission_answer_is_a_job(schema: dict[str, Any]) -> None:
    answers = schema["paths"]["/certify"]["post"]["responses"]
    for status in ("200", "202"):
        assert answers[status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/JobOut"
        }


def test_certificate_model_declares_the_stored_fields(schema: dict[str, Any]) -> None:
    models = schema["components"]["schemas"]
    certificate = models["CertificateOut"]
    assert certificate["additionalProperties"] is True  # later fields still pass
    assert {"weights_sha256", "checkpoint_sha256", "input_sha256", "label"} <= set(
        certificate["required"]
    )
    assert certificate["properties"]["timings"] == {"$ref": "#/components/schemas/Timings"}
    timings = models["Timings"]["properties"]
    assert {"selection_s", "estimation_s", "samples_per_s", "queued_s", "model_load_s"} <= set(
        timings
    )


def _file_fields(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(path, field, its schema or the file alternative of it) for every multipart upload."""
    for path, ops in schema["paths"].items():
        for op in ops.values():
            form = op.get("requestBody", {}).get("content", {}).get("multipart/form-data")
            if form is None:
                continue
            ref = form["schema"]["$ref"].rsplit("/", 1)[-1]
            for name, field in schema["components"]["schemas"][ref]["properties"].items():
                for node in [field, *field.get("anyOf", [])]:
                    if node.get("contentMediaType") == "application/octet-stream":
                        yield path, name, node


def test_upload_fields_are_binary(schema: dict[str, Any]) -> None:
    fields = list(_file_fields(schema))
    assert {(p, n) for p, n, _ in fields} == {
        ("/certify", "image"), ("/admin/models", "file"), ("/evaluations", "archive"),
    }  # fmt: skip
    for path, name, node in fields:
        assert node["type"] == "string" and node["format"] == "binary", (path, name, node)


def test_a_new_upload_route_gets_binary_too(tmp_path: Path) -> None:
    """The fix is the schema step, not a list of fields: any UploadFile field is marked."""
    app = create_app(service_settings(tmp_path / "data"))

    @app.post("/extra")
    def extra(
        files: Annotated[list[UploadFile], File()], maybe: Annotated[UploadFile | None, File()]
    ) -> None: ...

    found = {n: node for p, n, node in _file_fields(app.openapi()) if p == "/extra"}
    assert set(found) == {"maybe"}  # list[UploadFile]: the items are the files
    assert found["maybe"]["format"] == "binary"
    body = app.openapi()["components"]["schemas"]["Body_extra"]["properties"]
    assert body["files"]["items"]["format"] == "binary"


def test_real_error_bodies_match_the_declared_models(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "data" / "checkpoints" / "tiny.safetensors")
    app = create_app(service_settings(tmp_path / "data"))
    with TestClient(app) as client:
        from test_service_embedded import Service

        svc = Service(client, app, tmp_path)
        h = svc.h(svc.alice)
        field = client.get("/jobs", params={"limit": -1}, headers=h)
        content = client.post(
            "/certify", headers=h, files={"image": ("d.png", digit_png(0))}, data={"sigma": "9"}
        )
        for r in (field, content):
            assert r.status_code == 422, r.text
            ValidationErrorOut.model_validate_json(r.text, strict=True)
            assert set(r.json()) <= set(ValidationErrorOut.model_fields)
        assert field.json()["errors"][0]["loc"] == ["query", "limit"]
        assert isinstance(field.json()["detail"], str)


def test_docs_pages_load_nothing_from_outside(app: Any) -> None:
    with TestClient(app) as client:
        for page in ("/docs", "/redoc"):
            r = client.get(page)
            assert r.status_code == 200
            html = r.text
            assert not re.search(r"(https?:)?//[a-z0-9]", html, re.I), html
            assets = re.findall(r'(?:src|href)="([^"]+)"', html)
            assert len(assets) >= 2, html  # the script, and the favicon or the stylesheet
            for asset in assets:
                got = client.get(asset)
                assert got.status_code == 200 and len(got.content) > 100, asset
        assert client.get("/redoc/logo-mini.svg").status_code == 200  # ReDoc's own footer logo
        for licence in ("/docs/LICENSE", "/redoc/redoc.standalone.js.LICENSE.txt"):
            assert client.get(licence).status_code == 200
