"""Official DMAE files (issue 9 items 7 and 11): bare state dicts, attention heads never guessed,
default class names. State dicts use the official key layout, built here (no downloads); logits
are checked against the independent ViT forward of tests/test_checkpoints.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from service_support import digit_png, service_settings, wait_for
from test_checkpoints import (
    _meta_state,
    inputs,
    official_finetuned,
    official_pretrained,
    reference_logits,
    save_official_finetuned,
)

from cli import main
from cli.asgi import create_app
from domain.keys import create_key
from models.checkpoints import (
    CheckpointError,
    load_classifier,
    load_classifier_with_meta,
    load_model,
)
from models.networks import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD

# ---------------------------------------------------------------- 7a. bare state dicts


def test_a_bare_pretrained_state_dict_is_accepted(tmp_path: Path) -> None:
    """Issue item 7a: the released pre-trained file is the state dict itself (no 'model')."""
    state = official_pretrained(4, 16, 4, 64, 2, 256, 32, 2, 128)
    path = tmp_path / "dmae_pretrain_bare.pth"
    torch.save(state, path)
    model, meta = load_model(path)
    assert meta.kind == "pretrain" and meta.arch.embed_dim == 64 and meta.arch.num_heads == 1
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_finetuning_starts_from_a_bare_pretrained_file(tmp_path: Path) -> None:
    """``train finetune --pretrained`` on the released form (it was refused)."""
    from models.training.finetune import FinetuneConfig, load_pretrained

    state = official_pretrained(5, 16, 4, 128, 2, 256, 32, 1, 64)
    path = tmp_path / "bare.pth"
    torch.save(state, path)
    cfg = FinetuneConfig(data="digits:test", out=tmp_path / "ft", pretrained=str(path), sigma=0.25)
    pre = load_pretrained(cfg)
    assert pre.official and pre.meta.arch.num_heads == 2  # 128 / 64
    assert torch.equal(pre.state["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])


def test_a_bare_finetuned_state_dict_reproduces_the_reference_logits(tmp_path: Path) -> None:
    state = official_finetuned(6, 16, 4, 128, 2, 256, 5)
    path = tmp_path / "bare_ft.pth"
    torch.save(state, path)
    x = inputs(3, 16)
    with torch.no_grad():
        got = load_classifier(path)(x)
    torch.testing.assert_close(got, reference_logits(state, x, 2, IMAGENET_MEAN, IMAGENET_STD))


def test_other_dicts_are_still_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.pth")
    torch.save({"pos_embed": torch.zeros(1, 17, 8)}, tmp_path / "partial.pth")
    for name in ("other.pth", "partial.pth"):
        with pytest.raises(CheckpointError, match="bare state dict with the official keys"):
            load_model(tmp_path / name)


# ---------------------------------------------------------------- 7b. attention heads


def test_a_width_96_encoder_with_3_heads_is_refused_unless_heads_are_given(tmp_path: Path) -> None:
    """Issue item 7b: loaded as 1 head (96 // 64) with logits off by about 0.03, silently."""
    state = official_finetuned(3, 16, 4, 96, 2, 384, 5)
    path = save_official_finetuned(tmp_path / "w96.pth", state)
    x = inputs(2, 16)
    three = reference_logits(state, x, 3, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(CheckpointError, match="num_heads.*--num-heads"):
        load_classifier(path)
    with torch.no_grad():
        torch.testing.assert_close(load_classifier(path, num_heads=3)(x), three)
    with pytest.raises(CheckpointError, match="does not divide the width 96"):
        load_classifier(path, num_heads=5)


def test_a_model_name_that_disagrees_with_the_weights_is_refused(tmp_path: Path) -> None:
    state = official_finetuned(3, 16, 4, 96, 2, 384, 5)
    path = save_official_finetuned(tmp_path / "named.pth", state, model="vit_base_patch16")
    with pytest.raises(CheckpointError, match=r"ViT-base \(width 768, patch 16\).*num_heads"):
        load_classifier(path)


@pytest.mark.parametrize(
    ("dim", "patch", "name", "heads"),
    [
        (768, 16, "vit_base_patch16", 12),
        (1024, 16, "vit_large_patch16", 16),
        (1280, 14, "vit_huge_patch14", 16),
        (1280, 14, "dmae_vit_huge_patch14_dec512d8b", 16),
        (768, 16, None, 12),
        (1024, 16, None, 16),
        (192, 16, "my_vit", 3),
    ],
)
def test_heads_come_from_the_named_architecture_or_width_over_64(
    dim: int, patch: int, name: str | None, heads: int
) -> None:
    from models.checkpoints import infer_arch

    state = _meta_state(224 if patch == 16 else 224, patch, dim, 1, 4 * dim)
    assert infer_arch(state, model_name=name).num_heads == heads


@pytest.mark.parametrize(
    ("dim", "patch", "name", "match"),
    [
        (1280, 14, None, "ViT-H uses 16"),  # width / 64 = 20 would be wrong
        (96, 4, None, "width-96"),
        (768, 14, "vit_base_patch16", "patch 16"),
        (1024, 16, "vit_base_patch16", "width 768"),
    ],
)
def test_every_undecidable_head_count_is_refused(
    dim: int, patch: int, name: str | None, match: str
) -> None:
    from models.checkpoints import infer_arch

    with pytest.raises(CheckpointError, match=match) as err:
        infer_arch(_meta_state(16 * patch, patch, dim, 1, 4 * dim), model_name=name)
    assert "num_heads" in str(err.value) and "--num-heads" in str(err.value)


def test_the_cli_names_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = official_finetuned(3, 16, 4, 96, 2, 384, 5)
    path = save_official_finetuned(tmp_path / "w96.pth", state, sigma=0.25)
    argv = ["certify", "--input", "digits:test", "--max", "1", "--checkpoint", str(path),
            "--n0", "10", "--n", "50", "--alpha", "0.01", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--num-heads" in err and "Traceback" not in err
    assert main([*argv, "--num-heads", "3"]) == 0


# ---------------------------------------------------------------- 11. class names


@pytest.mark.parametrize(
    ("classes", "norm", "first", "source"),
    [
        (1000, (IMAGENET_MEAN, IMAGENET_STD), "tench, Tinca tinca", "ImageNet-1k"),
        (10, (CIFAR_MEAN, CIFAR_STD), "airplane", "CIFAR-10"),
        (10, (IMAGENET_MEAN, IMAGENET_STD), "0", "indices"),
        (1000, (CIFAR_MEAN, CIFAR_STD), "0", "indices"),
    ],
)
def test_default_class_names_follow_classes_and_normalisation(
    tmp_path: Path, classes: int, norm: Any, first: str, source: str
) -> None:
    """Issue item 11: an official ImageNet model showed labels '0'..'999'."""
    path = save_official_finetuned(
        tmp_path / "c.pth", official_finetuned(1, 8, 2, 64, 1, 128, classes)
    )
    _, meta = load_classifier_with_meta(path, mean=norm[0], std=norm[1])
    assert meta.classes[0] == first and len(meta.classes) == classes
    assert source in meta.classes_source
    if classes == 10 and first == "airplane":
        assert meta.classes[-1] == "truck"
    _, given = load_classifier_with_meta(path, mean=norm[0], std=norm[1], classes=["x"] * classes)
    assert given.classes == ["x"] * classes and given.classes_source == ""


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    app = create_app(service_settings(tmp_path / "data"))
    with TestClient(app) as client:
        with app.state.db.session() as s:
            key = create_key(s, "admin", admin=True)[1]
        yield client, key


def test_an_official_imagenet_model_serves_imagenet_labels(
    service: tuple[TestClient, str], tmp_path: Path
) -> None:
    client, key = service
    folder = tmp_path / "data" / "checkpoints"
    folder.mkdir(parents=True)
    state = official_finetuned(2, 8, 2, 64, 1, 128, 1000)
    state["head.bias"][1] += 50.0  # a clear favourite: class 1, the goldfish
    save_official_finetuned(folder / "inet.pth", state)
    h = {"X-API-Key": key}
    r = client.post("/admin/models", headers=h, data={"path": "inet.pth", "sigma": "0.25"})
    assert r.status_code == 201, r.text
    assert r.json()["classes"][:2] == ["tench, Tinca tinca", "goldfish, Carassius auratus"]
    form = {"model": "inet", "n0": "20", "n": "200", "alpha": "0.01"}
    image = {"image": ("d.png", digit_png(0))}
    job = client.post("/certify", headers=h, files=image, data=form).json()
    cert = wait_for(client.get, job["url"], key)["certificate"]
    assert cert["prediction"] == 1 and cert["label"] == "goldfish, Carassius auratus"
    assert "ImageNet-1k" in cert["label_source"]


def test_a_bare_state_dict_and_a_heads_error_over_http(
    service: tuple[TestClient, str], tmp_path: Path
) -> None:
    client, key = service
    h = {"X-API-Key": key}
    buf = tmp_path / "bare.pth"
    torch.save(official_finetuned(7, 8, 2, 64, 1, 128, 10), buf)
    r = client.post("/admin/models", headers=h, files={"file": ("bare.pth", buf.read_bytes())},
                    data={"name": "bare", "sigma": "0.25"})  # fmt: skip
    assert r.status_code == 201, r.text
    w96 = tmp_path / "w96.pth"
    save_official_finetuned(w96, official_finetuned(3, 16, 4, 96, 1, 384, 5))
    upload = {"file": ("w96.pth", w96.read_bytes())}
    r = client.post("/admin/models", headers=h, files=upload, data={"name": "w96"})
    assert r.status_code == 422 and "num_heads" in r.json()["detail"]
    r = client.post(
        "/admin/models", headers=h, files=upload, data={"name": "w96", "num_heads": "3"}
    )
    assert r.status_code == 201, r.text


def test_the_cli_says_where_class_names_come_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = official_finetuned(2, 8, 2, 64, 1, 128, 1000)
    state["head.bias"][1] += 50.0
    path = save_official_finetuned(tmp_path / "inet.pth", state, sigma=0.25)
    assert main(["certify", "--input", "digits:test", "--max", "1", "--checkpoint", str(path),
                 "--n0", "10", "--n", "50", "--alpha", "0.01", "--no-progress"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert "# class names: ImageNet-1k class names (timm ImageNetInfo), assumed" in captured.err
    assert "\tgoldfish, Carassius auratus radius=" in captured.out  # the input's own line
