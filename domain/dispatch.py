"""Handing job ids to whatever runs them. The HTTP layer and the sweep only see the
:class:`Dispatcher` protocol; the execution layer implements it (``worker.celery_app``'s
``CeleryDispatcher`` when a broker is configured, ``worker.runner.InProcessRunner`` otherwise)."""

from __future__ import annotations

from typing import Protocol


class Dispatcher(Protocol):
    def certify(self, job_id: str) -> None: ...

    def train(self, run_id: str) -> None: ...

    def backlog(self) -> int | None:
        """Messages waiting to be picked up (None: unknown)."""
        ...
