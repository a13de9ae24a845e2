"""The published description of the API: ``/openapi.json`` as clients need it, and the
``/docs`` (Swagger UI) and ``/redoc`` pages served without any CDN.

FastAPI builds the schema from the routes; :func:`install` replaces ``app.openapi`` (FastAPI's
documented extension point) with that schema plus two corrections that no route can make:

- **File uploads are ``format: binary``.** FastAPI describes an ``UploadFile`` field in the
  OpenAPI 3.1 way only (``contentMediaType: application/octet-stream``); client generators
  that read the 3.0 keyword (openapi-python-client among them) then type it as text and send
  a text field, which the server refuses. Every such field of a multipart request body gets
  ``format: binary`` as well, for every upload route, present or future.
- **422 is the body ``app.errors`` sends.** FastAPI adds its own ``HTTPValidationError``
  (``detail`` as a list) to each route with parameters; every reference to it becomes
  :class:`app.schemas.ValidationErrorOut` (``detail`` a sentence, ``errors`` a list).

- **Optional form, query and header fields are not nullable.** FastAPI declares ``x: float | None =
  None`` as ``anyOf: [number, null]``; a form or query string has no null, so generated
  clients sent the text ``null``, which the server refuses. Such a field is optional (not
  ``required``) and declared by its one real type; leaving it out means "none".

- **Links lead from what a POST creates to its operations.** ``POST /certify`` (and a replay)
  to ``/jobs/{job_id}...``, ``POST /evaluations`` to ``/evaluations/{evaluation_id}...``,
  ``POST /admin/training`` to ``/admin/training/{run_id}``, ``POST /admin/models`` to
  ``/admin/models/{name}/...`` (OpenAPI ``links``, the created resource's ``id`` or ``name``
  from the answer's body), so clients and checkers can follow them.

Each operation's ``operationId`` is its function's name (:func:`operation_id`), so generated
clients have ``certify``, ``get_job``, ``list_jobs``, ... rather than FastAPI's path-derived ids.

The Swagger UI and ReDoc scripts, styles and licences come from the ``fastapi-standalone-docs``
package and are served from under ``/docs/`` and ``/redoc/``, so the pages work air-gapped.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi_standalone_docs import StandaloneDocs

from app.schemas import ValidationErrorOut

COMPONENTS = "#/components/schemas/"
FASTAPI_422 = ("HTTPValidationError", "ValidationError")
UPLOAD = {"type": "string", "contentMediaType": "application/octet-stream"}


def install(app: FastAPI) -> None:
    """Serve the corrected schema at ``app.openapi_url`` and the off-line docs pages."""

    build = app.openapi  # FastAPI's own: builds once and caches in app.openapi_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            mark_binary_uploads(schema)
            drop_null_from_text_fields(schema)
            add_links(schema)
            use_validation_error_model(schema)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    # Swagger UI's default validator badge would send the schema to an outside service.
    app.swagger_ui_parameters = {"validatorUrl": None, **(app.swagger_ui_parameters or {})}
    StandaloneDocs(app)


def operation_id(route: APIRoute) -> str:
    """A route's ``operationId``: its function's name (``certify``, ``get_job``, ...), which
    generated clients use as the name of the call."""
    return route.name


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref", "")
    if ref.startswith(COMPONENTS):
        found: dict[str, Any] = schema["components"]["schemas"][ref[len(COMPONENTS) :]]
        return found
    return node


def _mark(node: dict[str, Any]) -> None:
    """``format: binary`` on this field if it is a file, including inside ``anyOf`` (optional
    uploads) and ``items`` (lists of uploads)."""
    if all(node.get(k) == v for k, v in UPLOAD.items()) and "contentEncoding" not in node:
        node["format"] = "binary"
    for alternative in node.get("anyOf", []) + node.get("oneOf", []):
        _mark(alternative)
    if isinstance(node.get("items"), dict):
        _mark(node["items"])


def mark_binary_uploads(schema: dict[str, Any]) -> None:
    """Add ``format: binary`` to every file field of every multipart request body."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            content = operation.get("requestBody", {}).get("content", {})
            form = content.get("multipart/form-data")
            if form is None:
                continue
            body = _resolve(schema, form.get("schema", {}))
            for field in body.get("properties", {}).values():
                _mark(field)


TEXT_BODIES = ("multipart/form-data", "application/x-www-form-urlencoded")


def _not_null(field: dict[str, Any]) -> None:
    """``field`` without its ``null`` alternative (one left: that one, inlined)."""
    alternatives = field.get("anyOf")
    if not alternatives or {"type": "null"} not in alternatives:
        return
    rest = [a for a in alternatives if a != {"type": "null"}]
    del field["anyOf"]
    if len(rest) == 1:
        field.update(rest[0])
    else:
        field["anyOf"] = rest
    if field.get("default", 0) is None:
        del field["default"]


def drop_null_from_text_fields(schema: dict[str, Any]) -> None:
    """Optional fields of form bodies, query strings and headers: their real type only."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter.get("in") in ("query", "header") and not parameter.get("required"):
                    _not_null(parameter.get("schema", {}))
            content = operation.get("requestBody", {}).get("content", {})
            for media in TEXT_BODIES:
                if media in content:
                    body = _resolve(schema, content[media].get("schema", {}))
                    required = set(body.get("required", []))
                    for name, field in body.get("properties", {}).items():
                        if name not in required:
                            _not_null(field)


# (POST path, created resource's path, its path parameter, the answer's field holding it)
CREATES = (
    ("/certify", "/jobs/{job_id}", "job_id", "id"),
    ("/jobs/{job_id}/replay", "/jobs/{job_id}", "job_id", "id"),
    ("/evaluations", "/evaluations/{evaluation_id}", "evaluation_id", "id"),
    ("/admin/training", "/admin/training/{run_id}", "run_id", "id"),
    ("/admin/models", "/admin/models/{name}", "name", "name"),
)


def add_links(schema: dict[str, Any]) -> None:
    """OpenAPI links from each success answer of a creating POST (:data:`CREATES`) to every
    operation on the resource it created (its path, or a path below it)."""
    paths = schema.get("paths", {})
    for source, resource, parameter, field in CREATES:
        post = paths.get(source, {}).get("post")
        if post is None:
            continue
        links = {
            operation["operationId"]: {
                "operationId": operation["operationId"],
                "parameters": {parameter: f"$response.body#/{field}"},
                "description": f"The {method.upper()} {path} of what this request created.",
            }
            for path, operations in paths.items()
            if path == resource or path.startswith(resource + "/")
            for method, operation in operations.items()
        }
        for status, answer in post.get("responses", {}).items():
            if status.startswith("2") and links:
                answer["links"] = dict(links)


def use_validation_error_model(schema: dict[str, Any]) -> None:
    """Point every 422 at ``ValidationErrorOut`` and drop FastAPI's own validation models."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    name = ValidationErrorOut.__name__
    if name not in components:
        own = ValidationErrorOut.model_json_schema(
            ref_template=COMPONENTS + "{model}", mode="serialization"
        )
        components.update(own.pop("$defs", {}))
        components[name] = own
    wrong = COMPONENTS + FASTAPI_422[0]
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            answer = operation.get("responses", {}).get("422", {})
            for media in answer.get("content", {}).values():
                if media.get("schema", {}).get("$ref") == wrong:
                    media["schema"] = {"$ref": COMPONENTS + name}
    for unused in FASTAPI_422:
        components.pop(unused, None)
