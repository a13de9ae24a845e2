"""Each sigma's default model is an explicit, visible choice (issue 26 item 6).

The failing input: a model registered through the admin API (or a training run's result) was
active at once and a ``sigma=0.25`` request without ``model`` then ran on it (the newest
active model of that sigma). Now such a request runs on the sigma's *default* model, which only
an admin sets (``default`` on registration, ``POST /admin/models/{name}/default``); the bundled
models are the defaults of a fresh service; without a default the request is a clear 422."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from service_support import (  # noqa: F401 - database and pg_url are fixtures
    database,
    digit_png,
    make_checkpoint,
    pg_url,
    service_settings,
)

from cli.asgi import create_app
from domain.keys import create_key
from domain.store import migrate
from domain.store.db import make_engine

QUICK = {"n0": "10", "n": "20"}


class Api:
    def __init__(self, client: TestClient, admin: str, folder: Path) -> None:
        self.client, self.h, self.folder = client, {"X-API-Key": admin}, folder

    def certify(self, **form: str) -> Any:
        png = {"image": ("d.png", digit_png(3))}
        return self.client.post("/certify", headers=self.h, files=png, data={**QUICK, **form})

    def model_for(self, sigma: float) -> str:
        """The model a request with ``sigma`` and no model name is queued for."""
        r = self.certify(sigma=str(sigma))
        assert r.status_code == 202, r.text
        return str(r.json()["model"])

    def models(self, admin: bool = False) -> dict[str, dict[str, Any]]:
        url = "/admin/models" if admin else "/models"
        return {m["name"]: m for m in self.client.get(url, headers=self.h).json()}

    def defaults(self) -> dict[str, float]:
        return {n: m["sigma"] for n, m in self.models().items() if m["default"]}

    def upload(self, name: str, sigma: float = 0.25, kind: str = "classifier", **form: str) -> Any:
        path = make_checkpoint(self.folder / f"{name}.safetensors", sigma=sigma, name=name)
        if kind == "pretrain":  # the same weights described as a pre-training checkpoint
            path = self._as_pretrain(path)
        files = {"file": (f"{name}.safetensors", path.read_bytes())}
        return self.client.post("/admin/models", headers=self.h, files=files, data=form)

    @staticmethod
    def _as_pretrain(path: Path) -> Path:
        from models.checkpoints import build_model, read_meta, save_checkpoint

        meta = read_meta(path)
        meta.kind, meta.num_classes, meta.classes = "pretrain", 0, []
        save_checkpoint(path, build_model(meta), meta)
        return path

    def post(self, url: str) -> Any:
        return self.client.post(url, headers=self.h)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    app = create_app(service_settings(tmp_path / "data", register_bundled=True))
    with TestClient(app) as client:
        with app.state.db.session() as s:
            admin = create_key(s, "admin", admin=True)[1]
        yield Api(client, admin, tmp_path / "files")


def test_the_bundled_models_are_the_defaults_of_a_fresh_service(api: Api) -> None:
    # the first bundled model (by name) of each sigma: digits before mnist at 0.25 and 0.5
    assert api.defaults() == {"digits-s0.25": 0.25, "digits-s0.50": 0.5, "mnist-s1.00": 1.0}
    assert api.model_for(0.25) == "digits-s0.25" and api.model_for(0.5) == "digits-s0.50"
    assert api.model_for(1.0) == "mnist-s1.00"


def test_registering_a_model_does_not_take_default_traffic(api: Api) -> None:
    """The failing input: an uploaded sigma-0.25 model served every sigma-0.25 request."""
    r = api.upload("tiny-s0.25")
    assert r.status_code == 201, r.text
    assert r.json()["active"] and not r.json()["default"]
    assert api.model_for(0.25) == "digits-s0.25"
    assert api.models()["tiny-s0.25"]["default"] is False  # listed, not the default
    # a request naming it runs on it
    assert api.certify(sigma="0.25", model="tiny-s0.25").json()["model"] == "tiny-s0.25"


def test_setting_the_default_moves_the_traffic_and_is_shown(api: Api) -> None:
    assert api.upload("tiny-s0.25").status_code == 201
    r = api.post("/admin/models/tiny-s0.25/default")
    assert r.status_code == 200 and r.json()["default"], r.text
    assert api.model_for(0.25) == "tiny-s0.25"
    assert api.defaults() == {
        "tiny-s0.25": 0.25,
        "digits-s0.50": 0.5,
        "mnist-s1.00": 1.0,
    }  # one per sigma
    everything = api.models(admin=True)
    assert everything["digits-s0.25"]["active"] and not everything["digits-s0.25"]["default"]
    # and back
    assert api.post("/admin/models/digits-s0.25/default").status_code == 200
    assert api.model_for(0.25) == "digits-s0.25"
    assert api.defaults() == {"digits-s0.25": 0.25, "digits-s0.50": 0.5, "mnist-s1.00": 1.0}


def test_default_on_registration_is_a_deliberate_choice(api: Api) -> None:
    r = api.upload("tiny-s0.25", default="true")
    assert r.status_code == 201 and r.json()["default"], r.text
    assert api.model_for(0.25) == "tiny-s0.25"
    assert api.defaults() == {"tiny-s0.25": 0.25, "digits-s0.50": 0.5, "mnist-s1.00": 1.0}


def test_a_sigma_without_a_default_is_a_clear_422(api: Api) -> None:
    assert api.upload("tiny-s0.25").status_code == 201
    r = api.post("/admin/models/digits-s0.25/deactivate")
    assert r.status_code == 200 and not r.json()["default"]  # a deactivated model is no default
    r = api.certify(sigma="0.25")
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "no default model for sigma=0.25" in detail and "tiny-s0.25" in detail
    assert "/admin/models/{name}/default" in detail
    # activating again does not make it the default again: that too is deliberate
    assert api.post("/admin/models/digits-s0.25/activate").status_code == 200
    assert api.certify(sigma="0.25").status_code == 422
    # a sigma no model is trained for: the message lists the sigmas that have one
    r = api.certify(sigma="0.75")
    assert r.status_code == 422 and "no active model trained for sigma=0.75" in r.text


@pytest.mark.parametrize(
    ("form", "kind", "message"),
    [
        ({"default": "true", "active": "false"}, "classifier", "deactivated"),
        ({"default": "true"}, "pretrain", "pre-training checkpoint"),
    ],
)
def test_a_model_that_cannot_serve_is_refused_as_a_default(
    api: Api, form: dict[str, str], kind: str, message: str
) -> None:
    r = api.upload("odd", kind=kind, **form)
    assert r.status_code == 422 and message in r.json()["detail"], r.text
    assert "odd" not in api.models(admin=True)  # nothing registered
    assert api.upload("odd", kind=kind, active=form.get("active", "true")).status_code == 201
    r = api.post("/admin/models/odd/default")
    assert r.status_code == 422 and message in r.json()["detail"]
    assert api.model_for(0.25) == "digits-s0.25"
    assert api.post("/admin/models/nope/default").status_code == 404


def test_training_asks_for_default_deliberately(api: Api) -> None:
    """A run's result becomes the default only with ``default``; the route refuses it where it
    could not be one (pre-training, a deactivated result)."""
    base = {"kind": "finetune", "dataset": "digits:train", "name": "x", "init": "none"}
    for body, message in [
        ({**base, "default": True, "activate": False}, "default needs activate"),
        ({**base, "kind": "pretrain", "init": None, "default": True}, "fine-tuning runs"),
    ]:
        r = api.client.post("/admin/training", headers=api.h, json=body)
        assert r.status_code == 422 and message in r.json()["detail"], r.text


# ---------------------------------------------------------------- the migration


def test_the_migration_keeps_rows_and_todays_traffic(database: str) -> None:
    """Existing rows are kept; each sigma's newest active classifier (what a request without
    a model ran on before) becomes its default; nothing else does."""
    migrate.upgrade(database, "0007")
    engine = make_engine(database)
    common = dict(
        location="bundled:x", file_sha256="0" * 64, weights_sha256="", format="project",
        num_classes=10, classes=[], input_size=8, arch={}, licence="", source="",
        import_options={}, created_at=sa.func.now(),
    )  # fmt: skip
    rows = [  # (id, name, kind, sigma, active)
        (1, "old-025", "classifier", 0.25, True),
        (2, "new-025", "classifier", 0.25, True),
        (3, "off-025", "classifier", 0.25, False),
        (4, "only-050", "classifier", 0.5, True),
        (5, "pre", "pretrain", 0.25, True),
        (6, "nosigma", "classifier", None, True),
        (7, "off-100", "classifier", 1.0, False),
    ]
    table = sa.Table("checkpoints", sa.MetaData(), autoload_with=engine)
    with engine.begin() as conn:
        for id_, name, kind, sigma, active in rows:
            values = dict(id=id_, name=name, kind=kind, sigma=sigma, active=active, **common)
            conn.execute(table.insert().values(**values))
    migrate.upgrade(database)
    with engine.connect() as conn:
        got = conn.execute(sa.text("SELECT name, active, is_default FROM checkpoints")).all()
    assert {(n, bool(a), bool(d)) for n, a, d in got} == {
        ("old-025", True, False),
        ("new-025", True, True),
        ("off-025", False, False),
        ("only-050", True, True),
        ("pre", True, False),
        ("nosigma", True, False),
        ("off-100", False, False),
    }
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:  # one default a sigma
        conn.execute(sa.text("UPDATE checkpoints SET is_default = :t WHERE name = 'old-025'"),
                     {"t": True})  # fmt: skip
    migrate.downgrade(database, "0007")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM checkpoints")).scalar() == len(rows)
    engine.dispose()


# ---------------------------------------------------------------- concurrent admins


def _models_at(url: str, rows: list[tuple[str, bool, bool]]) -> sa.Engine:
    """A migrated PostgreSQL database holding sigma-0.25 classifiers (name, active, default)."""
    from service_support import reset_postgres

    reset_postgres(url)
    migrate.upgrade(url)
    engine = make_engine(url)
    table = sa.Table("checkpoints", sa.MetaData(), autoload_with=engine)
    with engine.begin() as conn:
        for name, active, default in rows:
            conn.execute(table.insert().values(
                name=name, location="bundled:x", file_sha256="0" * 64, weights_sha256="",
                format="project", kind="classifier", sigma=0.25, num_classes=10, classes=[],
                input_size=8, arch={}, licence="", source="", import_options={},
                active=active, is_default=default, created_at=sa.func.now(),
            ))  # fmt: skip
    return engine


def _race(engine: sa.Engine, first: Any, second: Any) -> BaseException | None:
    """Run ``first`` in a transaction left open, start ``second`` in another thread, wait (a
    deadline, no fixed sleep) until PostgreSQL shows it waiting on a lock held by ``first``,
    then commit ``first``: the interleaving two admins' concurrent requests can have. Returns
    what ``second`` raised, if anything."""
    import threading
    import time

    from sqlalchemy.orm import Session

    failed: list[BaseException] = []

    def run_second() -> None:
        try:
            with Session(engine) as s:
                second(s)
                s.commit()
        except BaseException as exc:
            failed.append(exc)

    with Session(engine) as s1:
        first(s1)
        thread = threading.Thread(target=run_second, daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        waiting = 0
        while not waiting and thread.is_alive():
            assert time.monotonic() < deadline, "the second request never waited on a lock"
            with engine.connect() as conn:
                waiting = conn.execute(sa.text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )).scalar_one()  # fmt: skip
        s1.commit()
    thread.join(120)
    assert not thread.is_alive()
    return failed[0] if failed else None


def _defaults(engine: sa.Engine) -> dict[str, bool]:
    with engine.connect() as conn:
        got = conn.execute(sa.text("SELECT name, active FROM checkpoints WHERE is_default"))
        return {name: bool(active) for name, active in got}


def test_two_admins_setting_one_sigmas_default_at_once(pg_url: str) -> None:
    """Two POST /admin/models/{name}/default for one sigma at the same moment on PostgreSQL:
    the second waited for the first, then failed on the one-default index (a 500). Now it
    waits, then applies: the later call wins, one default."""
    from domain import registry

    engine = _models_at(pg_url, [("a", True, True), ("b", True, False), ("c", True, False)])
    failed = _race(
        engine, lambda s: registry.set_default(s, "b"), lambda s: registry.set_default(s, "c")
    )
    assert failed is None, repr(failed)
    assert _defaults(engine) == {"c": True}
    engine.dispose()


def test_deactivating_a_model_while_it_is_made_the_default(pg_url: str) -> None:
    """A deactivation committed while another admin makes the model the default: the default
    must not end up on a deactivated model (no request could use it, none could be routed)."""
    from domain import registry
    from domain.errors import ServiceError

    engine = _models_at(pg_url, [("a", True, True), ("b", True, False)])
    failed = _race(
        engine,
        lambda s: (registry.set_active(s, "b", False), s.flush()),
        lambda s: registry.set_default(s, "b"),
    )
    assert isinstance(failed, ServiceError) and failed.status_code == 422, repr(failed)
    assert "deactivated" in str(failed.detail)
    assert _defaults(engine) == {"a": True}
    engine.dispose()


def test_two_new_models_registered_as_one_new_sigmas_default_at_once(pg_url: str) -> None:
    """No row of the sigma existed to wait on: the second registration finds the first's
    default on the index and is refused with 409 (was a 500), keeping one default."""
    from domain import registry
    from domain.errors import ServiceError
    from domain.store.tables import Checkpoint

    engine = _models_at(pg_url, [])

    def add_default(name: str) -> Any:
        def run(s: Any) -> None:
            s.add(Checkpoint(
                name=name, location="bundled:x", file_sha256="0" * 64, format="project",
                kind="classifier", sigma=0.75, num_classes=10, classes=[], input_size=8,
                arch={}, import_options={}, active=True,
            ))  # fmt: skip
            s.flush()
            registry.set_default(s, name)

        return run

    failed = _race(engine, add_default("x"), add_default("y"))
    assert isinstance(failed, ServiceError) and failed.status_code == 409, repr(failed)
    assert "sigma=0.75" in failed.detail and "retry" in failed.detail
    assert _defaults(engine) == {"x": True}
    engine.dispose()
