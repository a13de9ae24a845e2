"""The FastAPI application, HTTP only: ``create_app(settings, dispatcher=...)``.

At start-up it checks the database schema (migrating SQLite automatically), registers the
bundled models, and opens the dispatcher it is given (a :data:`domain.dispatch.DispatcherFactory`).
Which runner that is (the in-process runner or Celery) is chosen by the composition root,
``cli.asgi`` (``uvicorn cli.asgi:app``).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager

import anyio
import anyio.to_thread
from fastapi import Depends, FastAPI

from app import api_docs, errors
from app.ratelimit import make_limiter
from app.routes import (
    admin,
    evaluations,
    health,
    jobs,
    metrics,
    models,
    previews,
    replays,
    signing,
    web,
)
from app.routes.deps import single_valued_form
from app.upload_files import MULTIPART_SLACK, BodyLimit
from domain.config import Settings
from domain.dispatch import DispatcherFactory, SentMarks
from domain.keys import KeyCache
from domain.store.db import MAX_OVERFLOW, POOL_SIZE, get_database

log = logging.getLogger("dmae.api")

JSON_BODY_LIMIT = 1024 * 1024
DESCRIPTION = """
Certified robustness for images: each job answers *which class does the Gaussian-smoothed DMAE
classifier give this image, and within what L2 radius is that answer provably unchanged?*

Authenticate with an API key in the `X-API-Key` header (`dmae-certify keys create`).
Submit with `POST /certify`, poll `GET /jobs/{id}`. Radii are L2 distances over the model's
input tensor: [0,1] RGB pixels after the documented resize and centre crop (see each
certificate's `space` and `input_shape`).
"""


def body_limits(settings: Settings) -> Callable[[str, str], int]:
    """The per-route request body cap used by :class:`app.upload_files.BodyLimit`."""

    def limit_for(method: str, path: str) -> int:
        if method == "POST" and path.rstrip("/") == "/certify":
            return settings.max_upload_bytes + MULTIPART_SLACK
        if method == "POST" and path.rstrip("/") == "/admin/models":
            return settings.max_checkpoint_bytes + MULTIPART_SLACK
        if method == "POST" and path.rstrip("/") == "/evaluations":
            return settings.max_archive_bytes + MULTIPART_SLACK
        return JSON_BODY_LIMIT

    return limit_for


def create_app(settings: Settings, dispatcher: DispatcherFactory) -> FastAPI:
    """The API. ``dispatcher`` opens how job ids reach the workers: entered when the app starts,
    exited at its shutdown (``cli.asgi.default_dispatcher``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from domain import keys, registry
        from domain.store import migrate
        from domain.trust import signing as signing_keys

        migrate.prepare_database(settings)
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        # Ending a request's transaction never waits behind routes for a thread (app.auth).
        app.state.session_closers = anyio.CapacityLimiter(POOL_SIZE + MAX_OVERFLOW)
        signing_keys.signer(settings)  # made at first start; a bad DMAE_SIGNING_KEY stops here
        signing_keys.seed_secret(settings)
        db = get_database(settings.database_url)
        app.state.db = db
        app.state.sent_marks = SentMarks(db)
        with db.session() as session:
            if settings.register_bundled:
                registry.register_bundled(session)
            if settings.embedded and keys.count_keys(session) == 0:
                _, token = keys.create_key(session, name="first key", admin=True)
                log.warning(
                    "No API key existed: created an admin key (shown once): %s  "
                    "e.g. curl -H 'X-API-Key: %s' -F image=@digit.png -F sigma=0.25 "
                    "%s/certify",
                    token,
                    token,
                    getattr(app.state, "base_url", "http://HOST:PORT"),  # set by `serve`
                )
        opened = ExitStack()
        app.state.dispatcher = opened.enter_context(dispatcher(settings))
        # Everything loaded so far (torch, the models, the ORM) lives as long as the process: a
        # full garbage collection walking its ~300,000 objects paused every request ~0.1 s.
        gc.freeze()
        try:
            yield
        finally:
            opened.close()  # the in-process runner stops before the last marks are written
            app.state.sent_marks.close()
            if hasattr(app.state.limiter, "aclose"):
                await app.state.limiter.aclose()

    app = FastAPI(
        title="dmae-certify",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=api_docs.operation_id,
        dependencies=[Depends(single_valued_form)],
    )
    app.state.settings = settings
    app.state.limiter = make_limiter(settings)
    app.state.keys = KeyCache(settings.key_cache_s)
    errors.install(app)
    api_docs.install(app)
    app.add_middleware(BodyLimit, limit_for=body_limits(settings))
    metrics.instrument(app)
    for module in (jobs, previews, replays, evaluations, models, admin, signing, health, metrics):
        app.include_router(module.router)
    web.install(app)  # the page for people at / (not part of the OpenAPI schema)
    return app
