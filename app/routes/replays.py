"""POST /jobs/{id}/replay (admin): re-run a finished job with its seed and compare its counts."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter

from app.auth import Admin, SessionDep
from app.errors import error_responses
from app.routes.deps import DispatcherDep, SessionEndingRoute, SettingsDep
from app.routes.jobs import EXAMPLE_QUEUED
from app.schemas import JobOut, job_out
from domain.services import dispatching

router = APIRouter(
    route_class=SessionEndingRoute, tags=["admin"], responses=error_responses(401, 403, 429, 503)
)

EXAMPLE_REPLAY: dict[str, Any] = {
    "replay_of": "0b6f3c1e-3f0e-4d53-9f5e-2d0a3b9c7e11",
    "identical": True,
    "counts": [0, 2, 0, 1, 0, 0, 0, 9991, 3, 3],
    "original_counts": [0, 2, 0, 1, 0, 0, 0, 9991, 3, 3],
    "differing_classes": [],
    "count_a": 9991,
    "original_count_a": 9991,
    "prediction": 7,
    "original_prediction": 7,
    "radius": 0.6312,
    "original_radius": 0.6312,
    "device": "cpu",
    "original_device": "cpu",
    "same_device_kind": True,
}

EXAMPLE_QUEUED_REPLAY: dict[str, Any] = {
    **EXAMPLE_QUEUED,
    "id": "5c0d2a77-9a43-4f0e-8a6e-0e4b7d1c2f30",
    "url": "/jobs/5c0d2a77-9a43-4f0e-8a6e-0e4b7d1c2f30",
    "seed_source": "derived",
    "replay_of": "0b6f3c1e-3f0e-4d53-9f5e-2d0a3b9c7e11",
    "replay": None,
}


@router.post(
    "/jobs/{job_id}/replay",
    status_code=202,
    response_model=JobOut,
    summary="Re-run a finished job with its seed and check its counts (admin)",
    responses={
        202: {
            "description": "Replay queued (a job of the calling admin's). Once it succeeded, "
            "GET /jobs/{id} of the replay shows `replay`, e.g. " + json.dumps(EXAMPLE_REPLAY),
            "content": {"application/json": {"example": EXAMPLE_QUEUED_REPLAY}},
        },
        **error_responses(
            404,
            409,
            why={
                404: "No such job.",
                409: "The job has no certificate to replay (not finished, failed or cancelled), or "
                "is itself a replay.",
            },
        ),
    },
)
def replay_job(
    job_id: str,
    admin: Admin,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
) -> JobOut:
    """Queue a replay of any client's finished job: a new job, owned by the calling admin, with
    the original's model, parameters, stored input and seed (``replay_of`` names the original).
    Poll `GET /jobs/{id}` of the replay: once it succeeded, ``replay`` says whether the counts
    are identical to the certificate's (`identical`) and on which devices both ran (counts are
    reproducible per kind of device). A replay makes no certificate: the original keeps its
    one, and replays do not count in `prior_runs`."""
    return job_out(dispatching.replay(session, admin, job_id, settings, dispatcher), None)
