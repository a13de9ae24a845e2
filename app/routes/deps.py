"""Request-scoped access to the app's settings and dispatcher."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from domain.config import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_dispatcher(request: Request) -> Any:
    return request.app.state.dispatcher


SettingsDep = Annotated[Settings, Depends(get_settings)]
DispatcherDep = Annotated[Any, Depends(get_dispatcher)]

MAX_OFFSET = 2**31 - 1  # page offsets beyond any table, and within every database's integers
