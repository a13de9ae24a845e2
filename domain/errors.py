"""Errors the service's rules raise, each with the HTTP status and a sentence for the client.

Domain code raises :class:`ServiceError` (or a subclass); the HTTP layer (``app.errors``) turns
every error into a JSON answer with a readable ``detail``.
"""

from __future__ import annotations

ADMISSION_RETRY_S = 10  # Retry-After (s) of a refusal by an admission cap


class ServiceError(Exception):
    """An error with an HTTP status and a message meant for the client."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


def hide_folders(text: str, folders: list[tuple[str, str]]) -> str:
    """``text`` with each server folder (``Settings.private_folders``: path, label) replaced by
    its label: what the service tells a client (errors, a job's or training run's ``error``)
    never names a server path."""
    for path, label in folders:
        text = text.replace(path, label)
    return text


def bad_input(detail: str) -> ServiceError:
    """422: the request is well-formed but its content cannot be used."""
    return ServiceError(422, detail)


def not_found(what: str) -> ServiceError:
    return ServiceError(404, f"{what} not found")


class BrokerUnavailable(ServiceError):
    """The job is stored but could not be handed to the broker (``job_id``: which job)."""

    def __init__(self, detail: str, job_id: str | None = None):
        super().__init__(503, detail, {"Retry-After": "30"})
        self.job_id = job_id
