"""``dmae-certify train ablation``: its smoke form end to end, its restart, and its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from scipy.stats import norm

from cli import main as cli_main
from cli.ablation import VARIANTS, mean_sd, tsv_metrics
from models.evaluate import Row, write_tsv
from models.smoothing import clopper_pearson_lower, max_radius


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def test_smoke_ablation_trains_certifies_and_tabulates_all_four_recipes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "train",
        "ablation",
        "--smoke",
        "--seeds",
        "0",
        "--sigmas",
        "0.5",
        "--out",
        str(tmp_path),
    ]
    assert cli_main(argv) == 0
    table = (tmp_path / "table.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    runs = results["runs"]
    assert [r["recipe"] for r in runs] == [v.recipe for v in VARIANTS.values()]
    for r in runs:
        assert r["images"] == 6 and r["sigma"] == 0.5 and r["seed"] == 0
        accuracy = list(r["certified_accuracy"].values())
        assert len(accuracy) == 5 and accuracy == sorted(accuracy, reverse=True)
        assert 0 <= r["acr"] <= r["max_radius"]
        assert r["max_radius"] == pytest.approx(max_radius(0.5, 100, 0.001), abs=1e-4)
    for v in VARIANTS.values():
        assert f"| 0.5 | ({v.key}) `{v.recipe}` |" in table
    assert "Ranking by mean ACR: sigma 0.5:" in table and "n = 100," in table
    assert "can reach at these n and alpha (sigma x Phi^-1(alpha^(1/n)), " in table
    assert "sigma 0.5: 0.75." in table  # 0.7502 rounded down
    times = json.loads((tmp_path / "times.json").read_text())
    assert len(times) == 2 + 4 + 4  # two pre-trainings, four fine-tunings, four certifications
    capsys.readouterr()

    # a restart finds every step done and rebuilds the same table
    assert cli_main(argv) == 0
    assert (tmp_path / "table.md").read_text() == table
    assert capsys.readouterr().err.count("done already") == 10


def test_ablation_commands_differ_only_where_the_recipes_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["train", "ablation", "--out", str(tmp_path), "--print-commands"]) == 0
    lines = capsys.readouterr().out.splitlines()
    pretrain = [line for line in lines if " train pretrain " in line]
    finetune = [line for line in lines if " train finetune " in line]
    certify = [line for line in lines if " certify " in line]
    assert (len(pretrain), len(finetune), len(certify)) == (6, 24, 24)  # 3 seeds, 2 sigmas
    assert all("--n 10000 --alpha 0.001" in line and "--max -1" in line for line in certify)
    assert all("--epochs 100 " in line and "--layer-decay 0.75" in line for line in finetune)
    mae = [line for line in pretrain if "--sigma 0 --loss-on masked" in line]
    assert len(mae) == 3 and all("--epochs 200 " in line for line in pretrain)
    seed0 = [line for line in finetune if "--seed 0 " in line and "--sigma 0.25 " in line]
    assert len(seed0) == 4
    a, b, c, d = seed0
    assert "pretrain-dmae-seed0" in a and "pretrain-mae-seed0" in b
    assert "--pretrained none --arch digits" in c and "--copies" not in c
    assert "--pretrained none --arch digits --copies 1 --lbd 0 --eta 0 --label-smoothing 0" in d
    assert not (tmp_path / "times.json").exists()  # nothing ran
    assert cli_main(["train", "ablation", "--out", str(tmp_path), "--variants", "a,e"]) == 2
    assert "--variants must name some of a,b,c,d" in capsys.readouterr().err
    assert cli_main(["train", "ablation", "--out", str(tmp_path), "--seeds", "0,-1"]) == 2
    assert "--seeds must be comma-separated whole numbers" in capsys.readouterr().err


def _row(idx: int, label: int, predict: int, count_a: int, n: int, sigma: float) -> Row:
    alpha = 0.001
    pa = clopper_pearson_lower(count_a, n, alpha)
    radius = sigma * float(norm.ppf(pa)) if predict >= 0 else 0.0
    return Row(idx, label, predict, radius, 0.1, count_a, n, pa, 100, sigma, alpha,
               max_radius(sigma, n, alpha), f"digits:{idx}")  # fmt: skip


def test_figures_use_full_precision_radii(tmp_path: Path) -> None:
    # a certificate whose radius is just below 0.5 (0.5000 if it were rounded to nearest)
    n, k = 10_000, 9_500
    sigma = round(0.49997 / float(norm.ppf(clopper_pearson_lower(k, n, 0.001))), 6)
    rows = [
        _row(0, 3, 3, k, n, sigma),  # correct, radius just under 0.5
        _row(1, 4, 4, n, n, sigma),  # correct, the largest radius n allows (> 1)
        _row(2, 5, 6, n, n, sigma),  # wrong: counts nowhere
        _row(3, 7, -1, 5000, n, sigma),  # abstained
    ]
    path = tmp_path / "c.tsv"
    write_tsv(path, rows)
    assert f"{rows[0].radius:.4f}" == "0.5000" and f"\t{rows[0].radius!r}\t" in path.read_text()
    m = tsv_metrics(path)
    assert m["certified_accuracy"] == {"0": 0.5, "0.25": 0.5, "0.5": 0.25, "0.75": 0.25, "1": 0.25}
    assert m["acr"] == pytest.approx((rows[0].radius + rows[1].radius) / 4, abs=1e-12)
    assert m["abstained"] == 1

    tampered = path.read_text().replace(f"\t{rows[1].radius!r}\t", "\t1.9\t")
    path.write_text(tampered)
    with pytest.raises(ValueError, match="is not CERTIFY's"):
        tsv_metrics(path)


def test_mean_and_sample_standard_deviation() -> None:
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_sd([0.5]) == (0.5, None)
