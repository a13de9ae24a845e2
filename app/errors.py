"""Error answers in one place: every error is JSON with a readable ``detail``.

Domain code raises :class:`domain.errors.ServiceError` (or a subclass); request validation,
HTTP errors, an unreachable database or broker and unexpected exceptions are all mapped here,
so a client never sees a traceback.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute

from app.schemas import ErrorOut, UnavailableOut, ValidationErrorOut
from domain.errors import BrokerUnavailable, ServiceError, hide_folders

log = logging.getLogger("dmae.api")

# What each error status means when a route does not say more, and the body it carries.
MEANING = {
    400: "Malformed request body: not parseable as its content type (JSON or multipart).",
    401: "Missing, invalid or revoked API key.",
    403: "This route needs an admin key.",
    404: "Not found.",
    409: "Conflicts with the current state.",
    413: "Request body or upload larger than its limit.",
    415: "Not a supported image format.",
    422: "Invalid request: `errors` lists the invalid fields.",
    429: "Rate limit of this API key exceeded; retry after `Retry-After` seconds.",
    503: "Database or job queue unavailable; retry after `Retry-After` seconds.",
}
BODY: dict[int, type[ErrorOut]] = {422: ValidationErrorOut, 503: UnavailableOut}


def error_responses(*codes: int, why: dict[int, str] | None = None) -> dict[int | str, Any]:
    """OpenAPI ``responses`` for these error statuses, each with the model of the body the
    handlers below send (``why``: a route's own description of a status)."""
    why = why or {}
    return {
        code: {"model": BODY.get(code, ErrorOut), "description": why.get(code, MEANING[code])}
        for code in codes
    }


NOT_AN_OBJECT = ("dict_type", "model_attributes_type", "model_type")


def _where(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "form"):
        parts = parts[1:]
    return ".".join(parts) or "request"


def describe_validation(errors: Sequence[Any]) -> str:
    """Pydantic/FastAPI validation errors as one sentence per problem."""
    lines = []
    for err in errors:
        msg = str(err.get("msg", "invalid value"))
        if err.get("type") == "missing":
            msg = "this field is required"
        elif tuple(err.get("loc", ())) == ("body",) and err.get("type") in NOT_AN_OBJECT:
            msg = "the body must be a JSON object, sent with Content-Type: application/json"
        lines.append(f"{_where(err.get('loc', ()))}: {msg}")
    return "; ".join(lines) or "invalid request"


def _hidden(request: Request, text: str) -> str:
    """``text`` without the server's folders (``domain.errors.hide_folders``)."""
    settings = getattr(request.app.state, "settings", None)
    return text if settings is None else hide_folders(text, settings.private_folders())


def _json(
    request: Request,
    status: int,
    detail: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """The JSON error answer; no server folder is named in it, whatever the message held."""
    body = {"detail": _hidden(request, detail), **extra}
    if "errors" in body:
        body["errors"] = [
            {**e, "msg": _hidden(request, str(e.get("msg", "")))} for e in body["errors"]
        ]
    return JSONResponse(body, status_code=status, headers=headers)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    if isinstance(exc, BrokerUnavailable) and exc.job_id:  # stored: the client may poll it
        return _json(request, exc.status_code, exc.detail, exc.headers, id=exc.job_id)
    return _json(request, exc.status_code, exc.detail, exc.headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method the request's path answers, over all the routes that match it (a path may
    be served by several routes: ``GET`` and ``DELETE /jobs/{id}``), sorted."""
    path = request.scope["path"]
    methods: set[str] = set()
    for route in _leaves(request.app.router.routes):
        regex, said = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if regex is not None and said and regex.match(path):
            methods |= set(said)
    return sorted(methods)


def _leaves(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes, with those of each included router in its place."""
    for route in routes:
        inner = getattr(route, "original_router", None)  # FastAPI's wrapper of an included router
        yield from _leaves(inner.routes) if inner is not None else (route,)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:  # RFC 9110 15.5.6: Allow lists all of the path's methods
        headers["Allow"] = ", ".join(allowed_methods(request))
        detail = f"{request.method} is not allowed here; this path allows {headers['Allow']}"
    return _json(request, exc.status_code, detail, headers or None)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
    return _json(request, 422, describe_validation(errors), errors=jsonable_encoder(errors))


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, DataError):  # e.g. a NUL character, which PostgreSQL text cannot hold
        log.warning("value refused by the database: %s", str(exc).splitlines()[0][:300])
        return _json(
            request,
            422,
            "the request holds a value the database cannot store or look up (for example a "
            "NUL character in an id, a name or a path): remove it",
        )
    if not isinstance(exc, OperationalError) and not getattr(exc, "connection_invalidated", 0):
        return await _unexpected(request, exc)  # e.g. an integrity error: a bug, not an outage
    log.warning("database unavailable: %s", str(exc).splitlines()[0][:300])
    return _json(request, 503, "the database is unavailable; retry shortly", {"Retry-After": "5"})


async def _pool_timeout(request: Request, exc: Exception) -> JSONResponse:
    """Every connection of the process's pool stayed in use for the pool's whole timeout."""
    log.warning("no database connection free: %s", str(exc).splitlines()[0][:300])
    return _json(request, 503, "the database is busy; retry shortly", {"Retry-After": "5"})


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    ref = uuid.uuid4().hex[:12]
    log.exception("unhandled error %s on %s %s", ref, request.method, request.url.path)
    return _json(request, 500, f"internal error (reference {ref}); the operators have the details")


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(PoolTimeout, _pool_timeout)
    app.add_exception_handler(Exception, _unexpected)
