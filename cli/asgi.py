"""The composition root of the HTTP service: the FastAPI app wired to its runner.

``create_app()`` is what ``dmae-certify serve`` starts; ``uvicorn cli.asgi:app`` also works
(built from the environment on first access). With no broker configured (the embedded default)
jobs run in this process (``worker.runner.InProcessRunner``); with one, they go to Celery
workers (``worker.celery_app.CeleryDispatcher``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from fastapi import FastAPI

from app import main
from domain.config import Settings, get_settings
from domain.dispatch import Dispatcher


@contextmanager
def default_dispatcher(settings: Settings) -> Iterator[Dispatcher]:
    """The in-process runner (started here, stopped on exit) or the Celery dispatcher."""
    if settings.embedded:
        from worker.runner import InProcessRunner

        runner = InProcessRunner(settings)
        runner.start()
        try:
            yield runner
        finally:
            runner.stop()
    else:
        from worker.celery_app import CeleryDispatcher

        yield CeleryDispatcher(settings)


def create_app(settings: Settings | None = None, dispatcher: Dispatcher | None = None) -> FastAPI:
    """The API from ``settings`` (default: the environment); ``dispatcher`` overrides how job
    ids reach the workers (tests)."""
    if dispatcher is None:
        return main.create_app(settings or get_settings(), default_dispatcher)
    given = dispatcher
    return main.create_app(settings or get_settings(), lambda _settings: nullcontext(given))


def __getattr__(name: str) -> FastAPI:
    """``cli.asgi:app`` for uvicorn, built from the environment on first access."""
    if name == "app":
        return create_app()
    raise AttributeError(name)
