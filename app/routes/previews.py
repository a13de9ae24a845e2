"""GET /jobs/{id}/input.png and GET /jobs/{id}/noisy.png: what the model sees (owner only)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from app.auth import Client, SessionDep
from app.errors import error_responses
from app.routes.deps import SessionEndingRoute
from domain import previews

router = APIRouter(
    route_class=SessionEndingRoute,
    tags=["certification"],
    responses=error_responses(401, 404, 429, 503),
)

NO_SUCH_JOB = error_responses(
    404, why={404: "No such job among yours (or it has no stored input)."}
)
HEADERS = {"Cache-Control": "no-store"}  # fetched with a key: never shared through a cache


def _png(description: str) -> dict[int | str, Any]:
    return {
        200: {
            "description": description,
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        }
    }


@router.get(
    "/jobs/{job_id}/input.png",
    response_class=Response,  # errors are JSON; the 200 is declared as image/png
    summary="The job's input exactly as certified, as a PNG",
    responses={**_png("An S x S RGB PNG: the certified tensor, round(255 x)."), **NO_SUCH_JOB},
)
def job_input_png(job_id: str, client: Client, session: SessionDep) -> Response:
    """The preprocessed (3, S, S) tensor the certificate's radius is about (after the resize and
    centre crop, in [0,1]), at its own size S x S, 8 bits per channel. Scale it up for display
    with nearest-neighbour sampling (CSS ``image-rendering: pixelated``)."""
    _, x = previews.job_input(session, client.id, job_id)
    return Response(previews.input_png(x), media_type="image/png", headers=HEADERS)


@router.get(
    "/jobs/{job_id}/noisy.png",
    response_class=Response,  # errors are JSON; the 200 is declared as image/png
    summary="A strip of noisy copies of the job's input at its sigma",
    responses={
        **_png("k copies side by side (1 white pixel apart), each S x S, clipped to [0,1]."),
        **error_responses(404, 422, why={404: "No such job among yours.", 422: "k outside 1..16."}),
    },
)
def job_noisy_png(
    job_id: str,
    client: Client,
    session: SessionDep,
    k: Annotated[
        int, Query(ge=1, le=previews.MAX_COPIES, description="Number of noisy copies, 1 to 16.")
    ] = 4,
) -> Response:
    """``x + sigma * z`` for ``k`` Gaussian draws ``z``, at the job's sigma, as the smoothed
    classifier sees them. The noise comes from a seed derived from the job id and a fixed label,
    never from the certificate's seed, so the certificate's own samples stay unrevealed; the
    same job always shows the same copies. Clipped to [0,1] for display only (the classifier
    gets them unclipped)."""
    job, x = previews.job_input(session, client.id, job_id)
    return Response(previews.noisy_strip_png(job, x, k), media_type="image/png", headers=HEADERS)
