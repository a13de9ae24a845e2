"""End-to-end runs of ``dmae-certify certify/predict`` on real images, both checkpoint formats."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from cli import main
from models.checkpoints import CheckpointMeta, load_classifier, save_checkpoint
from models.data import DIGITS_MEAN, DIGITS_STD, digits_stats, load_image, preprocess
from models.evaluate import TSV_COLUMNS
from models.networks import DMAEClassifier, preset
from models.smoothing import BatchSampler, certify

CLASSES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def project_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = DMAEClassifier(preset("tiny"), 10, 8, DIGITS_MEAN, DIGITS_STD)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    meta = CheckpointMeta(
        kind="classifier", arch=preset("tiny"), input_size=8, mean=DIGITS_MEAN,
        std=DIGITS_STD, num_classes=10, classes=CLASSES, sigma=0.25,
    )  # fmt: skip
    save_checkpoint(path, model, meta)
    return path


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fine-tuned file in the official training script's layout (ImageNet mean/std, 16 px)."""
    torch.manual_seed(1)
    model = DMAEClassifier(preset("tiny"), 10, 16)
    path = tmp_path_factory.mktemp("official") / "checkpoint-99.pth"
    args = argparse.Namespace(model="vit_tiny", nb_classes=10, epochs=100, sigma=0.5)
    torch.save(
        {"model": model.state_dict(), "optimizer": {}, "epoch": 99, "scaler": {}, "args": args},
        path,
    )
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's two sample photos as PNG and JPEG files."""
    folder = tmp_path_factory.mktemp("photos")
    china, flower = load_sample_images().images
    Image.fromarray(china).save(folder / "china.png")
    Image.fromarray(flower).save(folder / "flower.jpg", quality=95)
    return folder


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_digits_constants_match_train_split() -> None:
    mean, std = digits_stats()
    assert np.allclose(mean, DIGITS_MEAN, atol=1e-6) and np.allclose(std, DIGITS_STD, atol=1e-6)


def test_certify_digits_tsv_matches_core(project_ckpt: Path, tmp_path: Path) -> None:
    out, plot = tmp_path / "r.tsv", tmp_path / "r.png"
    code = main([
        "certify", "--input", "digits:test", "--checkpoint", str(project_ckpt), "--n0", "20",
        "--n", "300", "--alpha", "0.01", "--seed", "5", "--skip", "40", "--max", "5",
        "--out", str(out), "--plot", str(plot), "--no-progress",
    ])  # fmt: skip
    assert code == 0
    rows = read_tsv(out)
    assert list(rows[0])[:6] == ["idx", "label", "predict", "radius", "correct", "time"]
    assert tuple(rows[0]) == TSV_COLUMNS
    assert [int(r["idx"]) for r in rows] == [0, 40, 80, 120, 160]
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"

    # Each row is exactly the core's certificate for that input with seed = base seed + index.
    from models.data import open_inputs

    model = load_classifier(project_ckpt)
    sampler = BatchSampler(model, 10, batch_size=1000)
    inputs = open_inputs("digits:test", 8)
    for r in rows:
        i = int(r["idx"])
        x, label, _ = inputs[i]
        cert = certify(sampler, x, 0.25, 20, 300, 0.01, seed=5 + i)
        assert int(r["label"]) == label
        assert int(r["predict"]) == (-1 if cert.prediction is None else cert.prediction)
        assert int(r["count_a"]) == cert.count_a
        assert float(r["radius"]) == pytest.approx(cert.radius, abs=1e-4)
        assert int(r["correct"]) == int(cert.prediction == label)


def test_certify_photo_folder_with_official_checkpoint(
    official_ckpt: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "photos.tsv"
    code = main([
        "certify", "--input", str(photos), "--checkpoint", str(official_ckpt), "--n0", "10",
        "--n", "200", "--out", str(out), "--no-progress", "--num-heads", "4",
    ])  # fmt: skip
    assert code == 0
    rows = read_tsv(out)
    assert [r["name"] for r in rows] == ["china.png", "flower.jpg"]
    assert all(r["label"] == "-1" and r["correct"] == "0" for r in rows)
    assert all(float(r["sigma"]) == 0.5 for r in rows)  # the official args' sigma is the default
    assert "fraction certified" in capsys.readouterr().out


def test_imagefolder_labels_and_single_file(
    photos: Path, project_ckpt: Path, tmp_path: Path
) -> None:
    root = tmp_path / "folder"
    for cls, src in (("3", "china.png"), ("7", "flower.jpg")):
        (root / cls).mkdir(parents=True)
        Image.open(photos / src).save(root / cls / "a.png")
    out = tmp_path / "f.tsv"
    assert main(["predict", "--input", str(root), "--checkpoint", str(project_ckpt),
                 "--n", "100", "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    rows = read_tsv(out)
    assert [r["label"] for r in rows] == ["3", "7"]  # folder names are the model's classes
    assert [r["name"] for r in rows] == ["3/a.png", "7/a.png"]

    single = tmp_path / "one.tsv"
    assert main(["certify", "--input", str(photos / "china.png"), "--checkpoint",
                 str(project_ckpt), "--n", "100", "--n0", "10", "--out", str(single),
                 "--no-progress"]) == 0  # fmt: skip
    assert len(read_tsv(single)) == 1


def test_preprocess_is_resize_shorter_side_and_centre_crop(photos: Path) -> None:
    x = load_image(photos / "china.png", 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # A wide image: the centre crop keeps the middle columns only.
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    for xx in range(10, 20):
        for yy in range(10):
            img.putpixel((xx, yy), (0, 0, 255))
    t = preprocess(img, 10)
    assert torch.allclose(t[2], torch.ones(10, 10)) and torch.allclose(t[0], torch.zeros(10, 10))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--input", "/nonexistent/x.png"], "is not a file"),
        (["--input", "digits:valid"], "digits split"),
        (["--input", "digits:test", "--sigma", "-1"], "sigma must be"),
        (["--input", "digits:test", "--alpha", "0.7"], "alpha must lie"),
        (["--input", "digits:test", "--n", "0"], "n must be"),
        (["--input", "digits:test", "--checkpoint", "no-such-model"], "no checkpoint file"),
    ],
)
def test_bad_arguments_give_a_message_not_a_traceback(
    argv: list[str], message: str, project_ckpt: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if "--checkpoint" not in argv:
        argv = [*argv, "--checkpoint", str(project_ckpt)]
    assert main(["certify", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
