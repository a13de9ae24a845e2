"""``dmae-certify bench`` in CI size: every case runs and the JSON carries the agreed keys.

No timing assertions: speed is shown by the benchmark's printed ratios (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from scipy.stats import chi2_contingency

from bench.reference import reference_counts
from bench.summary import summarise
from cli import main
from models.networks import DMAEClassifier, preset
from models.smoothing import NoiseStream
from worker.engine import Engine

KEYS = (
    "device",
    "model",
    "reference_samples_per_s",
    "engine_samples_per_s",
    "engine_concurrent_samples_per_s",
    "service_samples_per_s",
)
SMALL = ["--device", "cpu", "--n", "300", "--n0", "20", "--jobs", "3", "--job-n", "100"]


def test_ci_sized_benchmark_writes_every_case(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "bench" / "cpu.json"
    rc = main(["bench", "--model", "tiny", *SMALL, "--rounds", "2", "--service", "off",
               "--json", str(out)])  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert all(k in result for k in KEYS)
    assert result["device"].startswith("cpu") and result["model"] == "tiny"
    for case in ("reference", "engine", "engine_concurrent"):
        rate = result[f"{case}_samples_per_s"]
        assert isinstance(rate, float) and math.isfinite(rate) and rate > 0
        per = result["seconds_per_certificate"][case]
        assert per["100000"] == pytest.approx((100_000 + 20) / rate)
        assert rate == max(r[case] for r in result["rounds"])  # best of the 2 rounds
    assert result["service_samples_per_s"] is None and "--service off" in result["service_note"]
    ratios = result["ratios"]
    assert ratios["engine_over_reference"] == pytest.approx(
        result["engine_samples_per_s"] / result["reference_samples_per_s"]
    )
    assert ratios["concurrent_over_engine"] == pytest.approx(
        result["engine_concurrent_samples_per_s"] / result["engine_samples_per_s"]
    )
    s = result["settings"]
    assert (s["n"], s["jobs"], s["job_n"], s["reference_batch"]) == (300, 3, 100, 400)
    # Every sample of every case went through the engine's batches exactly once.
    warm_up = 20 + 300
    per_round = (20 + 300) + 3 * (20 + 100)
    assert result["engine_stats"]["rows"] == warm_up + 2 * per_round
    table = summarise([result])
    assert "| tiny | engine_concurrent |" in table and "c/b = " in table
    printed = capsys.readouterr().out
    assert "b/a (engine vs reference)" in printed and "c/b (3 jobs vs one)" in printed
    assert "(d) service" in printed and "skipped" in printed


def test_reference_loop_samples_the_same_distribution_as_the_engine() -> None:
    """The baseline must do the same work: its counts and the engine's are one distribution."""
    torch.manual_seed(0)
    model = DMAEClassifier(preset("tiny"), 10, 8).eval()
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    ref = reference_counts(model, x, 0.5, 3000, 10)
    with Engine("cpu") as engine:
        engine.register("m", model, 10)
        ours = engine.sampler("m").counts(x, 0.5, 3000, NoiseStream(3, x.shape)).numpy()
    assert ref.sum() == ours.sum() == 3000
    seen = (ref + ours) > 0
    table = [ref[seen], ours[seen]]
    assert chi2_contingency(table).pvalue > 1e-4


def test_bad_benchmark_settings_get_a_message(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--device", "cpu", "--n", "0"]) == 2
    assert "--n must be at least 1" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--service-url", "http://x"]) == 2
    assert "--api-key" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err


@pytest.mark.slow
def test_service_case_certifies_over_http(tmp_path: Path) -> None:
    """Case (d) for real: the embedded service started, the bench model registered, one job."""
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "tiny", *SMALL, "--rounds", "1", "--service-n", "200"]
    assert main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["service_note"] is None, result["service_note"]
    assert result["service_samples_per_s"] > 0 and result["service_enqueue_s"] > 0
    assert result["service_job_timings"]["samples_per_s"] > 0  # the job really sampled
    assert result["seconds_per_certificate"]["service"]["10000"] > 0


def test_ratios_are_reported_per_round_with_their_spread(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    rc = main(["bench", "--model", "tiny", *SMALL, "--rounds", "3", "--service", "off",
               "--json", str(out)])  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    spread = result["ratio_rounds"]["engine_over_reference"]
    per_round = [r["engine"] / r["reference"] for r in result["rounds"]]
    assert spread["rounds"] == pytest.approx(per_round) and len(per_round) == 3
    assert spread["min"] <= spread["median"] <= spread["max"]
    assert spread["median"] == pytest.approx(sorted(per_round)[1])
    assert result["ratio_rounds"]["service_over_engine"] is None  # not measured: no ratio


DECIDE_SMALL = ["bench", "--decide", "--device", "cpu", "--max-inputs", "4", "--n", "400",
                "--big-n", "600", "--big-count", "2", "--jobs", "2", "--rounds", "2",
                "--fixed-count", "1", "--n0", "20"]  # fmt: skip


def test_ci_sized_decide_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "decide.json"
    assert main([*DECIDE_SMALL, "--targets", "0.25,0.5", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "digits-s0.25" and result["input"] == "digits:test"
    assert [d["target_radius"] for d in result["decisions"]] == [0.25, 0.5]
    for d in result["decisions"] + result["big_n"]:
        assert sum(d["decisions"].values()) == d["inputs"]
        assert 0 < d["n_used_median"] <= d["n"] and 0 <= d["agreement"] <= 1
        assert d["estimation_samples_saved"] == pytest.approx(d["n"] / d["n_used_mean"])
        # DECIDE merges selection by default (n0 = 0): its total is n_used
        assert d["samples_total_median"] == d["n_used_median"]
        assert d["total_samples_saved"] == pytest.approx((100 + d["n"]) / d["n_used_mean"])
        wrong = d["disagreements"]["decide_only"] + d["disagreements"]["fixed_only"]
        assert d["agreement"] == pytest.approx(1 - wrong / d["inputs"])
    assert [d["inputs"] for d in result["decisions"]] == [4, 4]
    assert [d["inputs"] for d in result["big_n"]] == [2, 2] and result["big_n"][0]["n"] == 600
    assert len(result["rounds"]) == 2
    assert (result["settings"]["n0"], result["settings"]["decide_n0"]) == (20, 0)
    for name in ("certificates_per_s_decide_over_fixed", "certificates_per_s_decide_over_staged"):
        ratio = result["ratios"][name]
        assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"], name
    for r in result["rounds"]:  # merged over n0 = 20, both DECIDE on the same inputs and seeds
        assert r["staged_certificates_per_s"] > 0
    printed = capsys.readouterr().out
    assert "samples/s, decide / fixed" in printed and "the first 2 inputs only" in printed
    assert "certificates/s, decide / n0=20" in printed


def test_bad_decide_benchmark_settings_get_a_message(capsys: pytest.CaptureFixture) -> None:
    assert main([*DECIDE_SMALL, "--targets", "a,b"]) == 2
    assert "--targets must be comma-separated radii" in capsys.readouterr().err
    assert main([*DECIDE_SMALL, "--targets", "-1"]) == 2
    assert "--targets must be positive radii" in capsys.readouterr().err
    assert main([*DECIDE_SMALL, "--decide-n0", "-1"]) == 2
    assert "--decide-n0 must be at least 0" in capsys.readouterr().err
    assert main([*DECIDE_SMALL, "--input", "/no/such/folder"]) == 2
    assert "/no/such/folder" in capsys.readouterr().err
