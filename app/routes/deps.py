"""Request-scoped access to the app's settings and dispatcher."""

from __future__ import annotations

import functools
import inspect
from collections import Counter
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request, params
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from app.auth import HEADER, end_session
from domain.config import Settings
from domain.dispatch import Dispatcher, SentMarks
from domain.errors import bad_input

FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")


def _ending_sessions(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    """``endpoint`` (sync), ending the transaction of any database session it was given in its
    own thread as it returns or raises (the session's connection goes back to the pool)."""

    @functools.wraps(endpoint)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return endpoint(*args, **kwargs)
        finally:
            for value in kwargs.values():
                if isinstance(value, Session) and value.in_transaction():
                    end_session(value)

    return run


class SessionEndingRoute(APIRoute):
    """A route whose sync endpoint ends its database session's transaction in its own thread.
    FastAPI validates a returned model on one of the routes' threads (``DMAE_API_THREADS``):
    a session still holding its connection while it waited for one let a burst of 150
    ``GET /jobs`` empty the pool of 40 (``app.auth.get_session`` ends the rest)."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _ending_sessions(endpoint)
        super().__init__(path, endpoint, **kwargs)


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


async def get_sent_marks(request: Request) -> SentMarks:
    marks: SentMarks = request.app.state.sent_marks
    return marks


SettingsDep = Annotated[Settings, Depends(get_settings)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
SentMarksDep = Annotated[SentMarks, Depends(get_sent_marks)]

MAX_OFFSET = 2**31 - 1  # page offsets beyond any table, and within every database's integers


def _form_names(dependant: Dependant) -> set[str]:
    """The form fields (``Form``, ``File``) a route and its dependencies declare."""
    names = {f.alias for f in dependant.body_params if isinstance(f.field_info, params.Form)}
    for sub in dependant.dependencies:
        names |= _form_names(sub)
    return names


def _header_names(dependant: Dependant) -> set[str]:
    """The headers a route and its dependencies declare (``Header``), lower case."""
    names = {f.alias.lower() for f in dependant.header_params}
    for sub in dependant.dependencies:
        names |= _header_names(sub)
    return names


def _repeated_header(request: Request) -> str | None:
    """A header the route reads (or the API key) that the request gives more than once."""
    route = request.scope.get("route")
    seen = Counter(k for k, _ in request.headers.raw)
    for name, times in seen.items():
        if times < 2:
            continue
        header = name.decode("latin-1").lower()
        if header == HEADER.lower() or (
            isinstance(route, APIRoute) and header in _header_names(route.dependant)
        ):
            return header
    return None


async def single_valued_form(request: Request) -> None:
    """422 when a form field, or a header the route reads, is given more than once (which value
    would count is not the client's to guess), or a form field is not one the route takes (it
    would be ignored without a word). The form is the one FastAPI parsed already; Starlette
    caches it."""
    if (header := _repeated_header(request)) is not None:
        raise bad_input(f"header {header!r} given more than once: give it once")
    if not request.headers.get("content-type", "").startswith(FORMS):
        return
    form = await request.form()
    repeated = sorted(k for k, c in Counter(k for k, _ in form.multi_items()).items() if c > 1)
    if repeated:
        names = ", ".join(repr(k) for k in repeated)
        raise bad_input(f"form field {names} given more than once: give each field once")
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known = _form_names(route.dependant)
    unknown = sorted(set(form.keys()) - known)
    if unknown and known:
        raise bad_input(
            f"unknown form field {', '.join(repr(k) for k in unknown)}: "
            f"{route.path} takes {', '.join(sorted(known))}"
        )
