"""Request-scoped access to the app's settings and dispatcher."""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any

from fastapi import Depends, Request

from domain.config import Settings
from domain.errors import bad_input

FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_dispatcher(request: Request) -> Any:
    return request.app.state.dispatcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
DispatcherDep = Annotated[Any, Depends(get_dispatcher)]

MAX_OFFSET = 2**31 - 1  # page offsets beyond any table, and within every database's integers


async def single_valued_form(request: Request) -> None:
    """422 when a form field is given more than once: which of the values would count is not
    the client's to guess (the form is the one FastAPI parsed already; Starlette caches it)."""
    if not request.headers.get("content-type", "").startswith(FORMS):
        return
    form = await request.form()
    repeated = sorted(k for k, c in Counter(k for k, _ in form.multi_items()).items() if c > 1)
    if repeated:
        names = ", ".join(repr(k) for k in repeated)
        raise bad_input(f"form field {names} given more than once: give each field once")
