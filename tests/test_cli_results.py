"""The CLI never loses results (issue 16, items 4-5): rows are on disk as each input finishes,
an interrupted or killed run leaves a valid TSV, --resume completes it identically, and every
input gets a line on stdout (or a JSON line with --json) while progress goes to stderr."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cli import main
from models.evaluate import read_tsv

INPUTS = ["--input", "digits:test", "--checkpoint", "digits-s0.25", "--alpha", "0.01"]
BASE = [*INPUTS, "--n0", "20"]
CLI = str(Path(sys.executable).parent / "dmae-certify")


def comparable(rows: list[Any]) -> list[tuple[Any, ...]]:
    """Every column but the wall time."""
    return [
        (r.idx, r.label, r.predict, r.radius, r.count_a, r.n, r.pa_lower, r.n0, r.sigma, r.alpha,
         r.max_radius, r.name, r.tensor_sha256, r.preprocessing, r.warnings)
        for r in rows
    ]  # fmt: skip


def test_interrupted_run_keeps_its_rows_and_resume_equals_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["certify", *BASE, "--n", "300", "--max", "8", "--no-progress"]
    whole = tmp_path / "whole.tsv"
    assert main([*args, "--out", str(whole)]) == 0
    capsys.readouterr()

    import cli.certify as cli

    calls = {"n": 0}

    def ctrl_c_after_three() -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt

    part = tmp_path / "part.tsv"
    monkeypatch.setattr(cli, "_interrupted", ctrl_c_after_three)
    assert main([*args, "--out", str(part)]) == 130
    out = capsys.readouterr()
    assert len(read_tsv(part)) == 3  # the finished rows, nothing lost
    assert "interrupted after 3 of 8" in out.err and "--resume" in out.err
    assert "certified accuracy over 3 input(s)" in out.out  # a summary all the same
    monkeypatch.setattr(cli, "_interrupted", lambda: None)
    assert main([*args, "--out", str(part), "--resume"]) == 0
    assert "resuming: 3 already" in capsys.readouterr().err
    assert comparable(read_tsv(part)) == comparable(read_tsv(whole))


def test_a_killed_run_leaves_a_valid_tsv_that_resume_completes(tmp_path: Path) -> None:
    """SIGKILL half-way (no chance to clean up): the TSV holds the finished rows."""
    args = ["certify", *BASE, "--n", "3000", "--max", "10", "--no-progress"]
    whole, part = tmp_path / "whole.tsv", tmp_path / "part.tsv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([CLI, *args, "--out", str(whole)], env=env, capture_output=True)
    assert run.returncode == 0, run.stderr
    proc = subprocess.Popen(
        [CLI, *args, "--out", str(part)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if part.exists() and part.read_text().count("\n") >= 3:  # header + 2 rows
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    kept = read_tsv(part)
    assert 2 <= len(kept) < 10, len(kept)
    assert comparable(kept) == comparable(read_tsv(whole))[: len(kept)]
    done = subprocess.run(
        [CLI, *args, "--out", str(part), "--resume"], env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    assert comparable(read_tsv(part)) == comparable(read_tsv(whole))


def test_resume_drops_a_cut_off_line_and_refuses_another_runs_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["certify", *BASE, "--n", "200", "--max", "4", "--no-progress"]
    whole, part = tmp_path / "whole.tsv", tmp_path / "part.tsv"
    assert main([*args, "--out", str(whole)]) == 0
    lines = whole.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:3]) + lines[3][:25])  # 2 rows and half a third
    assert main([*args, "--out", str(part), "--resume"]) == 0
    assert comparable(read_tsv(part)) == comparable(read_tsv(whole))
    capsys.readouterr()
    assert main(["certify", *BASE, "--n", "300", "--max", "4", "--out", str(part), "--resume"]) == 2
    assert "not from this run" in capsys.readouterr().err
    assert main(["certify", *BASE, "--n", "300", "--max", "4", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_one_line_per_input_on_stdout_progress_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["certify", *BASE, "--n", "200", "--max", "3"]) == 0
    out = capsys.readouterr()
    lines = [x for x in out.out.splitlines() if x.startswith("digits:")]
    assert len(lines) == 3
    for line in lines:
        name, label, result = line.split("\t")
        assert label.startswith("label=") and ("radius=" in result or "abstain" in result)
    assert "img" in out.err  # the progress bar
    assert main(["predict", *INPUTS, "--n", "200", "--max", "3", "--no-progress"]) == 0
    predicted = [x for x in capsys.readouterr().out.splitlines() if x.startswith("digits:")]
    assert len(predicted) == 3  # predict shows each input's class, not only an aggregate


def test_json_lines_are_the_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.tsv"
    assert main(["certify", *BASE, "--n", "200", "--max", "3", "--json", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    rows = read_tsv(out)
    assert [r["name"] for r in records] == [r.name for r in rows]
    for record, row in zip(records, rows, strict=True):
        assert record["radius"] == row.radius and record["counts"][record["prediction"] or 0] >= 0
        assert record["tensor_sha256"] == row.tensor_sha256 and record["label"] == row.label
    assert "certified accuracy" in captured.err  # the summary stays out of the JSON stream


def test_predict_refuses_a_radius_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["predict", *INPUTS, "--n", "200", "--max", "2", "--plot", str(tmp_path / "p.png")])
    assert code == 2
    assert "PREDICT certifies no radius" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()
