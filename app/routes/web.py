"""The web page for people: ``GET /`` (one HTML page), its files under ``/static/``, and
``GET /web/config.json`` (the certify form's defaults and the service's limits).

Plain HTML, CSS and JavaScript modules from ``app/web/static/``: no build step, nothing loaded
from another host (the Content-Security-Policy says so to the browser). The page calls the
JSON API with the key a person types in (kept in the tab's sessionStorage). These routes are
left out of the OpenAPI schema: they are the page, not the API.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from app.routes import jobs
from app.routes.deps import SettingsDep
from domain import previews
from domain.intake.images import IMAGE_FORMATS
from models.modes import DEFAULT, MODES

STATIC = Path(__file__).resolve().parent.parent / "web" / "static"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.api_route("/", methods=["GET", "HEAD"])
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


def certify_defaults() -> dict[str, Any]:
    """The defaults of POST /certify's optional fields, read from the route itself."""
    params = inspect.signature(jobs.certify).parameters
    out = {name: params[name].default for name in ("alpha", "n", "mode")}
    # n0's default depends on the mode (Mode.selection_samples): the default mode's, and the
    # deciding mode's (the page's help names both; each mode's is in "mode_facts")
    out["n0"] = MODES[DEFAULT].selection_samples(None)
    out["decide_n0"] = next(m.selection_samples(None) for m in MODES.values() if m.decides)
    return out


@router.get("/web/config.json")
def config(settings: SettingsDep) -> dict[str, Any]:
    """What the certify form needs before a key is typed: defaults, limits, accepted types."""
    return {
        "defaults": certify_defaults(),
        "modes": list(MODES),
        "mode_facts": {name: mode.facts() for name, mode in MODES.items()},
        "limits": {
            "alpha_above": 0.0,
            "alpha_below": 0.5,
            "n_max": settings.n_max,
            "n0_max": settings.n0_max,
            "max_upload_bytes": settings.max_upload_bytes,
            "max_checkpoint_bytes": settings.max_checkpoint_bytes,
            "jobs_page_max": settings.jobs_page_max,
            "noisy_copies_max": previews.MAX_COPIES,
        },
        "image_types": [f"image/{f.lower()}" for f in IMAGE_FORMATS],
    }


def install(app: FastAPI) -> None:
    """Serve the page at ``/`` and its files under ``/static/``."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
