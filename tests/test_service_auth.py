"""Authentication, ownership, admin-only routes, checkpoint registration and upload checks."""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from service_support import (  # noqa: F401 - tiny_checkpoint is a fixture
    SIGMA,
    digit_png,
    make_checkpoint,
    service_settings,
    tiny_checkpoint,
    wait_for,
)
from sqlalchemy import select
from test_service_embedded import SMALL, Service

from cli.asgi import create_app
from domain.keys import hash_token
from domain.store.tables import ApiKey, Job


@pytest.fixture
def service(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Service]:  # noqa: F811
    app = create_app(
        service_settings(tmp_path / "data", max_upload_bytes=20_000, max_image_pixels=10_000)
    )
    with TestClient(app) as client:
        svc = Service(client, app, tiny_checkpoint)
        assert svc.register().status_code == 201
        yield svc


def test_keys_are_required_and_stored_hashed(service: Service) -> None:
    png = digit_png(0)
    r = service.client.post("/certify", files={"image": ("d.png", png)}, data=SMALL)
    assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
    r = service.client.get("/jobs", headers={"X-API-Key": "dmae_not-a-key"})
    assert r.status_code == 401 and r.json()["detail"] == "invalid or revoked API key"
    with service.app.state.db.session() as s:
        stored = s.scalars(select(ApiKey.key_hash)).all()
    assert service.alice not in stored and hash_token(service.alice) in stored
    # A revoked key stops working.
    with service.app.state.db.session() as s:
        key = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_token(service.bob)))
        assert key is not None
        key.revoked_at = key.created_at
        s.commit()
    assert service.client.get("/jobs", headers=service.h(service.bob)).status_code == 401


def test_another_clients_job_does_not_exist_for_you(service: Service) -> None:
    job = service.submit(service.alice, digit_png(0)).json()
    wait_for(service.client.get, job["url"], service.alice)
    for method in ("get", "delete"):
        r = getattr(service.client, method)(job["url"], headers=service.h(service.bob))
        assert r.status_code == 404 and r.json()["detail"] == f"job {job['id']!r} not found"
    assert service.client.get("/jobs", headers=service.h(service.bob)).json()["total"] == 0
    assert (
        service.client.get("/jobs/no-such-id", headers=service.h(service.alice)).status_code == 404
    )


def test_admin_routes_refuse_client_keys(service: Service) -> None:
    calls = [
        ("get", "/admin/models", {}),
        ("post", "/admin/models", {"data": {"path": "tiny.safetensors", "name": "x"}}),
        ("post", "/admin/models/tiny-s0.25/deactivate", {}),
        ("post", "/admin/models/tiny-s0.25/activate", {}),
        (
            "post",
            "/admin/training",
            {"json": {"kind": "pretrain", "dataset": "digits:train", "name": "p"}},
        ),
        ("get", "/admin/training", {}),
    ]
    for method, url, kw in calls:
        r = getattr(service.client, method)(url, headers=service.h(service.alice), **kw)
        assert r.status_code == 403 and r.json()["detail"] == "this route needs an admin key", url
        assert getattr(service.client, method)(url, **kw).status_code == 401
    assert service.client.get("/admin/models", headers=service.h(service.admin)).status_code == 200


def test_registration_by_path_stays_inside_the_checkpoint_folder(
    service: Service, tmp_path: Path
) -> None:
    outside = make_checkpoint(tmp_path / "outside.safetensors", name="outside")
    for path in (
        "../../outside.safetensors",
        str(outside),
        "../checkpoints/../../outside.safetensors",
    ):
        r = service.register(path, name="evil")
        assert (
            r.status_code == 422 and "outside the server's checkpoint folder" in r.json()["detail"]
        ), path
    (service.checkpoint.parent / "link.safetensors").symlink_to(outside)
    r = service.register("link.safetensors", name="evil")
    assert r.status_code == 422 and "outside the server's checkpoint folder" in r.json()["detail"]
    assert service.register("missing.safetensors").status_code == 422
    assert service.register("tiny.safetensors").status_code == 409  # name taken
    r = service.register("tiny.safetensors", name="../x")
    assert r.status_code == 422 and "invalid model name" in r.json()["detail"]
    names = [
        m["name"]
        for m in service.client.get("/admin/models", headers=service.h(service.admin)).json()
    ]
    assert names == ["tiny-s0.25"]


def test_register_by_upload_and_refuse_pickled_code(
    service: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = make_checkpoint(tmp_path / "other.safetensors", sigma=0.5, name="other")
    r = service.client.post(
        "/admin/models",
        headers=service.h(service.admin),
        files={"file": ("../../weird name.bin", other.read_bytes())},
        data={"name": "tiny-s0.50", "default": "true"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["sigma"] == 0.5 and r.json()["active"]
    job = service.submit(service.alice, digit_png(0), sigma="0.5").json()
    assert job["model"] == "tiny-s0.50"
    assert wait_for(service.client.get, job["url"], service.alice)["status"] == "succeeded"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    evil = tmp_path / "evil.pth"
    import torch

    torch.save({"model": {"w": torch.zeros(1)}, "x": Exploit()}, evil)
    for payload in (evil.read_bytes(), pickle.dumps(Exploit()), b"", b"not a checkpoint"):
        r = service.client.post(
            "/admin/models",
            headers=service.h(service.admin),
            files={"file": ("m.pth", payload)},
            data={"name": "evil"},
        )
        assert r.status_code == 422, r.text
    assert "pwned" not in capsys.readouterr().out  # the pickled callable never ran
    uploads = service.app.state.settings.uploads / "uploaded"
    assert len(list(uploads.iterdir())) == 1  # refused uploads (and partial files) are removed


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_uploads_are_checked_before_decoding(service: Service) -> None:
    png = digit_png(0)
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(png)).save(jpeg, "JPEG")
    gif = io.BytesIO()
    Image.open(io.BytesIO(png)).save(gif, "GIF")
    cases = [
        (b"", 422, "empty"),
        (b"GIF89a" + b"\x00" * 50, 415, "not a supported image"),
        (gif.getvalue(), 415, "not a supported image"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415, "not a supported image"),
        (png[: len(png) // 2], 422, "truncated or corrupt"),
        (jpeg.getvalue()[:-40], 422, "truncated or corrupt"),
        (_png((200, 100)), 413, "exceeds the limit of 10000"),
        (b"\x89PNG" + b"\x00" * 30_000, 413, "larger than the limit"),
    ]
    for data, status, message in cases:
        r = service.client.post(
            "/certify",
            headers=service.h(service.alice),
            files={"image": ("x.png", data, "image/png")},
            data=SMALL,
        )
        assert r.status_code == status, (message, r.text)
        assert message in r.json()["detail"], r.json()
    # Neither the filename nor the declared content type matter: the bytes do.
    r = service.client.post(
        "/certify",
        headers=service.h(service.alice),
        files={"image": ("x.gif", jpeg.getvalue(), "text/plain")},
        data=SMALL,
    )
    assert r.status_code == 202
    with service.app.state.db.session() as s:
        assert len(s.scalars(select(Job)).all()) == 1


def test_request_body_cap_applies_while_streaming(service: Service) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(200):
            yield b"x" * 1024

    r = service.client.post(
        "/certify",
        headers={**service.h(service.alice), "Content-Type": "multipart/form-data; boundary=b"},
        content=chunks(),
    )
    assert r.status_code == 413 and "larger than the limit" in r.json()["detail"]
    r = service.client.post(
        "/admin/training", headers=service.h(service.admin), content=b"{" + b" " * 2_000_000 + b"}"
    )
    assert r.status_code == 413


def test_register_an_official_finetuned_file(service: Service, tmp_path: Path) -> None:
    """An official-format file ({'model', 'args'}) is imported with the options its format does
    not store, and serves requests like a project checkpoint."""
    import argparse

    import torch

    from models.checkpoints import load_classifier_with_meta

    model, meta = load_classifier_with_meta(service.checkpoint)
    official = tmp_path / "data" / "checkpoints" / "official" / "dmae_tiny_ft.pth"
    official.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "epoch": 3,
                "args": argparse.Namespace(sigma=0.5, model="vit_tiny")}, official)  # fmt: skip
    form = {"path": "official/dmae_tiny_ft.pth", "input_size": "8", "num_heads": "4",
            "classes": ",".join(meta.classes), "mean": ",".join(map(str, meta.mean)),
            "std": ",".join(map(str, meta.std)), "default": "true"}  # fmt: skip
    r = service.client.post("/admin/models", headers=service.h(service.admin), data=form)
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["name"] == "dmae_tiny_ft" and info["format"] == "official"
    assert info["sigma"] == 0.5 and info["input_size"] == 8 and "CC BY-NC 4.0" in info["licence"]
    job = service.submit(service.alice, digit_png(0), sigma="0.5").json()
    done = wait_for(service.client.get, job["url"], service.alice)
    assert done["status"] == "succeeded" and done["certificate"]["model"] == "dmae_tiny_ft"
    # Same weights, same seed, same preprocessing: the same counts as the project checkpoint.
    twin = service.submit(service.alice, digit_png(0), model="tiny-s0.25", sigma="0.5",
                          seed=str(done["seed"])).json()  # fmt: skip
    twin_done = wait_for(service.client.get, twin["url"], service.alice)
    assert twin_done["certificate"]["counts"] == done["certificate"]["counts"]
