"""Training runs through the service: pre-train, fine-tune from it, the result is registered and
certifies requests; bad runs are refused up front."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient
from service_support import digit_png, make_checkpoint, service_settings, wait_for

from cli.asgi import create_app
from domain.keys import create_key

FAST = {"epochs": 1, "batch_size": 512, "warmup_epochs": 0}


def test_pretrain_finetune_register_certify(tmp_path: Path) -> None:
    app = create_app(service_settings(tmp_path / "data"))
    with TestClient(app) as client:
        with app.state.db.session() as s:
            admin = {"X-API-Key": create_key(s, admin=True)[1]}
        refused = [
            ({"kind": "finetune", "dataset": "digits:train", "name": "x"}, "needs init"),
            (
                {"kind": "pretrain", "dataset": "../../etc", "name": "x"},
                "outside the server's dataset folder",
            ),
            ({"kind": "pretrain", "dataset": "digits:all", "name": "x"}, "built-in datasets"),
            (
                {
                    "kind": "pretrain",
                    "dataset": "digits:train",
                    "name": "x",
                    "params": {"bogus": 1},
                },
                "unknown pretrain parameter(s) bogus",
            ),
            ({"kind": "pretrain", "dataset": "digits:train", "name": "a/b"}, "invalid model name"),
            (
                {
                    "kind": "pretrain",
                    "dataset": "digits:train",
                    "name": "x",
                    "params": {"val_data": "/etc"},
                },
                "outside the server's dataset folder",
            ),
        ]
        for body, message in refused:
            r = client.post("/admin/training", headers=admin, json=body)
            assert r.status_code == 422 and message in r.json()["detail"], (body, r.text)

        pre = client.post(
            "/admin/training",
            headers=admin,
            json={
                "kind": "pretrain",
                "dataset": "digits:train",
                "name": "digits-pre",
                "params": {"arch": "tiny", **FAST},
            },
        )
        assert pre.status_code == 202, pre.text
        run = wait_for(client.get, pre.json()["url"], admin["X-API-Key"], timeout=300)
        assert run["status"] == "succeeded", run
        assert run["model"] == "digits-pre" and run["progress"]["done"] == 2

        # the sigma-0.5 default before the run (issue 26 item 6: a run must not replace it)
        incumbent = make_checkpoint(tmp_path / "incumbent.safetensors", 0.5, "incumbent")
        upload = {"file": ("incumbent.safetensors", incumbent.read_bytes())}
        r = client.post("/admin/models", headers=admin, data={"default": "true"}, files=upload)
        assert r.status_code == 201 and r.json()["default"], r.text
        ft = client.post(
            "/admin/training",
            headers=admin,
            json={
                "kind": "finetune",
                "dataset": "digits:train",
                "name": "digits-ft-s0.5",
                "sigma": 0.5,
                "init": "digits-pre",
                "params": {**FAST, "eval_images": 5, "eval_n": 11},
            },
        )
        run = wait_for(client.get, ft.json()["url"], admin["X-API-Key"], timeout=300)
        assert run["status"] == "succeeded", run
        listed = client.get("/admin/training", headers=admin).json()
        assert [r["name"] for r in listed["items"]] == ["digits-ft-s0.5", "digits-pre"]
        assert client.delete(ft.json()["url"], headers=admin).status_code == 409

        models = {m["name"]: m for m in client.get("/models", headers=admin).json()}
        assert list(models) == ["digits-ft-s0.5", "incumbent"]  # pre-trained: cannot classify
        assert models["digits-ft-s0.5"]["sigma"] == 0.5
        assert not models["digits-ft-s0.5"]["default"] and models["incumbent"]["default"]
        form = {"sigma": "0.5", "n0": "10", "n": "20"}
        r = client.post("/certify", headers=admin, files={"image": ("d.png", digit_png(1))},
                        data=form)  # fmt: skip
        assert r.status_code == 202 and r.json()["model"] == "incumbent", r.text
        r = client.post("/admin/models/digits-ft-s0.5/default", headers=admin)
        assert r.status_code == 200 and r.json()["default"], r.text
        r = client.post(
            "/certify",
            headers=admin,
            files={"image": ("d.png", digit_png(0))},
            data={"sigma": "0.5", "n0": "10", "n": "50"},
        )
        job = wait_for(client.get, r.json()["url"], admin["X-API-Key"])
        assert job["status"] == "succeeded" and job["certificate"]["model"] == "digits-ft-s0.5"
        assert job["certificate"]["recipe"] == "dmae+consistency"
        assert models["digits-ft-s0.5"]["recipe"] == "dmae+consistency"
        again = client.post(
            "/admin/training",
            headers=admin,
            json={"kind": "pretrain", "dataset": "digits:train", "name": "digits-pre"},
        )
        assert again.status_code == 409


def test_a_running_run_shows_its_log_tail(tmp_path: Path) -> None:
    """While a run trains, GET /admin/training/{id} carries the latest log lines (written with
    each heartbeat), not only once it has finished."""
    app = create_app(service_settings(tmp_path / "data"))
    with TestClient(app) as client:
        with app.state.db.session() as s:
            admin = {"X-API-Key": create_key(s, admin=True)[1]}
        r = client.post(
            "/admin/training",
            headers=admin,
            json={
                "kind": "pretrain",
                "dataset": "digits:train",
                "name": "digits-long",
                "params": {"arch": "tiny", **FAST, "epochs": 200},
            },
        )
        assert r.status_code == 202, r.text
        run = wait_for(client.get, r.json()["url"], admin["X-API-Key"], until=("running",))
        deadline = time.monotonic() + 300
        while not run["metrics"].get("log") and time.monotonic() < deadline:
            time.sleep(0.05)
            run = client.get(r.json()["url"], headers=admin).json()
        assert run["status"] == "running", run
        assert any("pre-training tiny" in line for line in run["metrics"]["log"]), run
        assert client.delete(r.json()["url"], headers=admin).json()["status"] == "cancelled"


def test_baselines_through_the_admin_api(tmp_path: Path) -> None:
    """init 'none' fine-tunes a random encoder (the from-scratch baselines), sigma 0 pre-trains
    plain MAE, and the registry and certificates name the recipe; misuse is a 422."""
    app = create_app(service_settings(tmp_path / "data"))
    with TestClient(app) as client:
        with app.state.db.session() as s:
            admin = {"X-API-Key": create_key(s, admin=True)[1]}

        def launch(body: dict) -> dict:
            r = client.post("/admin/training", headers=admin, json=body)
            assert r.status_code == 202, r.text
            run = wait_for(client.get, r.json()["url"], admin["X-API-Key"], timeout=300)
            assert run["status"] == "succeeded", run
            return run

        launch({"kind": "pretrain", "dataset": "digits:train", "name": "mae", "sigma": 0,
                "params": {"arch": "tiny", "loss_on": "masked", **FAST}})  # fmt: skip
        launch({"kind": "finetune", "dataset": "digits:train", "name": "cohen", "sigma": 0.25,
                "init": "none", "params": {"arch": "tiny", "copies": 1, "lbd": 0.0, "eta": 0.0,
                                           **FAST}, "default": True})  # fmt: skip
        everything = client.get("/admin/models", headers=admin).json()
        recipes = {m["name"]: m["recipe"] for m in everything}
        assert recipes == {"mae": "mae", "cohen": "scratch+gaussian"}
        defaults = {m["name"] for m in everything if m["default"]}
        assert defaults == {"cohen"}  # asked for with "default": true
        refused = [
            ({"kind": "finetune", "dataset": "digits:train", "name": "y", "sigma": 0,
              "init": "none", "params": {"arch": "tiny"}}, "sigma"),
            ({"kind": "finetune", "dataset": "digits:train", "name": "y", "init": "none",
              "params": {"arch": "nope"}}, "arch"),
            ({"kind": "pretrain", "dataset": "digits:train", "name": "y", "sigma": -1}, "sigma"),
        ]  # fmt: skip
        for body, word in refused:
            r = client.post("/admin/training", headers=admin, json=body)
            assert r.status_code == 422 and word in r.json()["detail"], (body, r.text)
