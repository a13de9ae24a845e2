"""``dmae-certify certify/predict`` on the issue's failing inputs (issue 9, items 6, 8, 9, 10 and
the ``preprocessing`` column; issue 16 item 6), with the bundled ``digits-s0.25``."""

from __future__ import annotations

import csv
import re
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli import main
from models.data import load_digits_split

DIGITS = "digits-s0.25"
FAST = ["--n0", "100", "--n", "1000", "--alpha", "0.001", "--no-progress"]


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def save_digit(path: Path, index: int) -> None:
    x, _, _ = load_digits_split("test")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(x[index, 0].numpy() * 255).astype(np.uint8)).save(path)


def indices_of(label: int, count: int) -> list[int]:
    _, y, _ = load_digits_split("test")
    return [i for i in range(len(y)) if int(y[i]) == label][:count]


# ---------------------------------------------------------------- 6. n too small for alpha


@pytest.mark.parametrize(
    ("argv", "minimum"),
    [
        (["certify", "--n", "5"], "n >= 10"),
        (["certify", "--n", "9"], "n >= 10"),
        (["predict", "--n", "9"], "n >= 11"),
        (["predict", "--n", "10"], "n >= 11"),
        (["certify", "--top2", "--n", "10"], "n >= 11"),
        (["certify", "--n", "6", "--alpha", "0.01"], "n >= 7"),
    ],
)
def test_n_too_small_for_alpha_is_refused_with_the_minimum(
    argv: list[str], minimum: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue item 6: ``predict --n 9`` printed empty rows; ``n=5`` certified max_radius -0.168."""
    code = main([*argv, "--input", "digits:test", "--max", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert minimum in err and "too small" in err and "Traceback" not in err


def test_the_smallest_n_is_accepted(tmp_path: Path) -> None:
    out = tmp_path / "r.tsv"
    assert main(["certify", "--input", "digits:test", "--max", "1", "--n", "10", "--n0", "10",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    assert float(read_tsv(out)[0]["max_radius"]) > 0


# ---------------------------------------------------------------- 8. ImageFolder labels


def test_imagefolder_of_the_models_class_names_uses_its_indices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue item 8: folders 3/ and 7/ were labelled 0/1: certified accuracy 0.000."""
    root = tmp_path / "subset"
    for label in (3, 7):
        for i in indices_of(label, 3):
            save_digit(root / str(label) / f"{i}.png", i)
    out = tmp_path / "subset.tsv"
    assert main(["certify", "--input", str(root), "--checkpoint", DIGITS, *FAST,
                 "--out", str(out)]) == 0  # fmt: skip
    rows = read_tsv(out)
    assert [r["label"] for r in rows] == ["3"] * 3 + ["7"] * 3
    assert [r["predict"] for r in rows] == [r["label"] for r in rows]
    table = capsys.readouterr().out.splitlines()
    assert table[-1].split("\t")[1] == "1.000"  # certified accuracy at r = 0


@pytest.mark.parametrize(
    ("folders", "named"),
    [(["cat"], ["'cat'"]), (["3", "seven"], ["'seven'"]), (["03", "x"], ["'03'", "'x'"])],
)
def test_folders_that_are_not_classes_are_refused_with_the_class_list(
    tmp_path: Path, folders: list[str], named: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    for name in folders:
        save_digit(tmp_path / "root" / name / "a.png", 0)
    code = main(["predict", "--input", str(tmp_path / "root"), "--n", "100", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert all(n in err for n in named) and "its classes are: 0, 1, 2, 3" in err
    assert "'3'" not in err.split("its classes")[0]  # only the unknown ones are named


def test_folder_names_map_to_any_models_class_names(tmp_path: Path) -> None:
    from models.data import open_inputs

    for name in ("eel", "dog"):
        save_digit(tmp_path / name / "a.png", 0)
    inputs = open_inputs(str(tmp_path), 8, ["cat", "dog", "eel"])
    assert [(label, name) for _, label, name in inputs.items] == [
        (1, "dog/a.png"),
        (2, "eel/a.png"),
    ]
    assert inputs.classes == ["cat", "dog", "eel"]
    training = open_inputs(str(tmp_path), 8)  # no model yet: sorted folder names
    assert [label for _, label, _ in training.items] == [0, 1] and training.classes == [
        "dog",
        "eel",
    ]


def test_imagenet_folders_may_use_wordnet_ids_and_refuse_ambiguous_names(tmp_path: Path) -> None:
    from models.classnames import imagenet_info
    from models.data import ImageFolderDataset

    names, wnids = imagenet_info()
    for folder in ("n01443537", "tench, Tinca tinca"):
        save_digit(tmp_path / "ok" / folder / "a.png", 0)
    data = ImageFolderDataset(tmp_path / "ok", 8, list(names))
    assert sorted(label for _, label, _ in data.items) == [0, 1]
    assert wnids[1] == "n01443537"
    save_digit(tmp_path / "crane" / "crane" / "a.png", 0)
    with pytest.raises(ValueError, match="names 2 classes"):
        ImageFolderDataset(tmp_path / "crane", 8, list(names))


# ---------------------------------------------------------------- 9. unreadable files


def _folder_with_bad_files(root: Path) -> None:
    save_digit(root / "a.png", 0)
    save_digit(root / "c.png", 1)
    good = (root / "a.png").read_bytes()
    (root / "b-truncated.png").write_bytes(good[: len(good) // 2])
    (root / "d-text.png").write_text("this is not an image\n")


def test_a_corrupt_file_refuses_the_set_or_is_skipped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue item 9: one bad file aborted the run with a PIL traceback and no output. Issue 26
    item 2: it refuses the set by default, naming each file (nothing is certified); with
    --skip-invalid the others are certified and the bad ones listed."""
    _folder_with_bad_files(tmp_path / "in")
    out = tmp_path / "r.tsv"
    code = main(["certify", "--input", str(tmp_path / "in"), "--checkpoint", DIGITS, *FAST,
                 "--out", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1 and not out.exists(), captured.err
    assert "2 file(s) of the set are not supported images ('b-truncated.png': " in captured.err
    assert "'d-text.png': not a readable image" in captured.err
    code = main(["certify", "--input", str(tmp_path / "in"), "--checkpoint", DIGITS, *FAST,
                 "--out", str(out), "--skip-invalid"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [r["name"] for r in read_tsv(out) if not r["idx"].startswith("#")] == [
        "a.png", "c.png",
    ]  # fmt: skip
    assert "warning: skipped b-truncated.png" in captured.err
    assert "warning: skipped d-text.png" in captured.err
    assert "Traceback" not in captured.err and "2 file(s) skipped" in captured.out


def test_a_corrupt_file_inside_a_class_folder_is_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _folder_with_bad_files(tmp_path / "in" / "7")
    out = tmp_path / "r.tsv"
    assert main(["predict", "--input", str(tmp_path / "in"), "--n", "200", "--no-progress",
                 "--out", str(out), "--skip-invalid"]) == 0  # fmt: skip
    assert [r["name"] for r in read_tsv(out) if not r["idx"].startswith("#")] == [
        "7/a.png", "7/c.png",
    ]  # fmt: skip
    assert "skipped 7/b-truncated.png" in capsys.readouterr().err
    assert main(["predict", "--input", str(tmp_path / "in"), "--n", "200", "--no-progress"]) == 1
    assert "'7/b-truncated.png': " in capsys.readouterr().err


def test_nothing_certifiable_exits_non_zero_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "y.jpg").write_bytes(b"\xff\xd8\xff")
    code = main(["certify", "--input", str(folder), "--n", "100", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "2 file(s) of the set are not supported images" in err
    code = main(["certify", "--input", str(folder), "--n", "100", "--no-progress",
                 "--skip-invalid"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "nothing could be certified" in err and "Traceback" not in err
    assert main(["certify", "--input", str(folder / "x.png"), "--no-progress"]) == 1
    assert "x.png: " in capsys.readouterr().err


# ---------------------------------------------------------------- 10. precision and rounding


def test_tsv_is_exact_and_every_printed_radius_is_rounded_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue item 10: 4-decimal radii (0.49996 -> 0.5000) were counted at r = 0.5. The TSV now
    reads back to the core's floats exactly, and no printed radius or pA bound exceeds them."""
    from models.checkpoints import load_classifier_with_meta
    from models.data import open_inputs
    from models.smoothing import BatchSampler, certify

    out = tmp_path / "r.tsv"
    code = main(["certify", "--input", "digits:test", "--checkpoint", DIGITS, "--max", "12",
                 "--n0", "20", "--n", "300", "--alpha", "0.01", "--no-progress", "--seed", "3",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    rows = read_tsv(out)
    model, meta = load_classifier_with_meta(DIGITS)
    sampler = BatchSampler(model, 10, 1000)
    inputs = open_inputs("digits:test", 8)
    printed = dict(re.findall(r"^(digits:\d+)\t.*radius=(\S+)", captured.out, re.M))
    shown_pa = dict(re.findall(r"^(digits:\d+)\t.*pA_lower=(\S+)", captured.out, re.M))
    certs = []
    for r in rows:
        i = int(r["idx"])
        cert = certify(sampler, inputs[i][0], 0.25, 20, 300, 0.01, seed=3 + i)
        certs.append(cert)
        assert float(r["radius"]) == cert.radius and float(r["max_radius"]) == cert.max_radius
        assert float(r["pa_lower"]) == cert.pa_lower
        if not cert.abstained:
            assert Decimal(printed[r["name"]]) <= Decimal(repr(cert.radius)), r["name"]
            assert Decimal(shown_pa[r["name"]]) <= Decimal(repr(cert.pa_lower)), r["name"]
    assert len(printed) == sum(not c.abstained for c in certs) >= 10
    # The accuracy table: exact values computed here, printed ones never above them.
    from models.evaluate import default_radii, round_down

    table = captured.out.splitlines()[-2:]
    radii = [float(v) for v in table[0].split("\t")[1:]]
    assert radii == default_radii(certs[0].max_radius)
    exact = [
        float(np.mean([int(r["correct"]) == 1 and float(r["radius"]) >= t for r in rows]))
        for t in radii
    ]
    shown = [Decimal(v) for v in table[1].split("\t")[1:]]
    assert all(s <= Decimal(repr(e)) for s, e in zip(shown, exact, strict=True))
    assert all(s == Decimal(round_down(e, 3)) for s, e in zip(shown, exact, strict=True))


def test_round_down_never_rounds_up() -> None:
    from models.evaluate import round_down

    assert round_down(0.49996) == "0.4999" and round_down(0.5) == "0.5000"
    rng = np.random.default_rng(0)
    for value in rng.uniform(0, 5, 2000):
        shown = round_down(float(value), 4)
        assert Decimal(shown) <= Decimal(repr(float(value))) < Decimal(shown) + Decimal("0.0001")
        assert float(shown) <= value


# ---------------------------------------------------------------- preprocessing column, warnings


def test_the_tsv_records_preprocessing_and_the_cli_prints_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16 item 6: a 640x427 photo certified by an 8x8 model gets a word about it."""
    from sklearn.datasets import load_sample_images

    photo = tmp_path / "china.png"
    Image.fromarray(load_sample_images().images[0]).save(photo)
    out = tmp_path / "r.tsv"
    assert main(["predict", "--input", str(photo), "--checkpoint", DIGITS, "--n", "100",
                 "--no-progress", "--out", str(out)]) == 0  # fmt: skip
    row = read_tsv(out)[0]
    steps = row["preprocessing"].split(" | ")
    assert steps[0] == "decode PNG RGB 640x427" and steps[1] == "8-bit RGB / 255"
    assert "bicubic resize of the centre square (106, 0, 533, 427) of 640x427" in steps[2]
    assert row["warnings"] == "downscaled 53x to the model's 8x8 input"
    assert len(row["tensor_sha256"]) == 64
    assert "china.png: warning: downscaled 53x to the model's 8x8 input" in capsys.readouterr().err
