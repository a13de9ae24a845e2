"""DECIDE and CERTIFY's time budget through the CLI and the service: `dmae-certify decide`,
`certify --time-budget`, POST /certify with mode=decide / time_budget_s, the stored job, the
signed certificate that verifies offline, and every misuse refused with a sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from service_support import SIGMA, digit_png, tiny_checkpoint  # noqa: F401
from test_service_embedded import SMALL, Service, service  # noqa: F401 - service is a fixture

from cli import main
from domain.trust.verification import check_statistics, verify_certificate
from models.evaluate import TSV_COLUMNS, read_tsv

DIGITS = ["--input", "digits:test", "--checkpoint", "digits-s0.25", "--no-progress"]


def test_cli_decide_rows_summary_and_agreement_with_certify(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, fixed = tmp_path / "decide.tsv", tmp_path / "certify.tsv"
    args = [*DIGITS, "--max", "24", "--n0", "50", "--n", "4000", "--alpha", "0.001"]
    assert main(["decide", *args, "--target-radius", "0.25", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert list(TSV_COLUMNS[:8]) == [
        "idx", "label", "predict", "radius", "correct", "time", "decision", "n_used",
    ]  # fmt: skip
    assert out.read_text().split("\n", 1)[0].split("\t")[:8] == list(TSV_COLUMNS[:8])
    rows = read_tsv(out)
    assert len(rows) == 24 and {r.bound for r in rows} == {"beta-binomial-mixture-cs"}
    assert all(r.target_radius == 0.25 and r.decision for r in rows)
    assert "decide at r=0.25 over 24 input(s)" in text and "samples_saved" in text
    used = sorted(r.n_used or 0 for r in rows)
    assert used[len(used) // 2] <= 400  # most inputs settle early (the cap is 4,000)
    for r in rows:  # a certified decision carries a radius of at least the target
        assert (r.decision == "certified") == (r.radius >= 0.25 and r.predict >= 0)
    assert main(["certify", *args, "--out", str(fixed)]) == 0
    agree = [
        (d.decision == "certified") == (c.radius >= 0.25 and c.predict >= 0)
        for d, c in zip(rows, read_tsv(fixed), strict=True)
    ]
    assert sum(agree) >= 22, agree


def test_cli_decide_and_budget_misuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["decide", *DIGITS, "--max", "2", "--target-radius", "0.5"]
    assert main([*base, "--n", "300"]) == 2  # n0 = 0: the first sample only picks a class
    assert "needs n >= 352" in capsys.readouterr().err
    assert main([*base, "--n", "300", "--n0", "100"]) == 2  # n caps the estimation samples
    assert "needs n >= 351" in capsys.readouterr().err
    assert main([*base, "--n", "1000", "--plot", str(tmp_path / "p.png")]) == 2
    assert "DECIDE answers at one radius" in capsys.readouterr().err
    assert main(["certify", *DIGITS, "--max", "1", "--time-budget", "-1"]) == 2
    assert "time budget must be a positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: decide needs its target
        main(["decide", *DIGITS, "--max", "1"])


def test_cli_budget_stop_is_recorded_and_its_statistics_recompute(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = [*DIGITS, "--max", "3", "--n0", "20", "--n", "100000", "--time-budget", "0.02"]
    assert main(["certify", *args, "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 3
    for record in records:
        assert record["n_used"] < 100_000 and record["bound"] == "beta-binomial-mixture-cs"
        assert check_statistics(record) is None  # the offline verifier's recomputation


def test_service_decide_job_is_stored_signed_and_verifies(service: Service) -> None:  # noqa: F811
    png = digit_png(3)
    r = service.submit(service.alice, png, mode="decide", target_radius="0.1", n="2000")
    assert r.status_code == 202, r.text
    assert r.json()["target_radius"] == 0.1 and r.json()["mode"] == "decide"
    job = service.wait(service.alice, r.json()["url"])
    assert job["status"] == "succeeded", job
    cert = job["certificate"]
    assert cert["mode"] == "decide" and cert["target_radius"] == 0.1
    assert cert["decision"] in ("certified", "not_certified", "undecided")
    assert cert["bound"] == "beta-binomial-mixture-cs" and 1 <= cert["n_used"] <= 2000
    assert job["progress"]["done"] == cert["n0"] + cert["n_used"]
    from domain.trust.signing import load_public_keys

    keys = load_public_keys(service.client.get("/keys").content)
    verdict = verify_certificate(cert, public_keys=keys)
    assert verdict.valid, verdict.reason
    # The same request is the same job; another target is another job.
    again = service.submit(service.alice, png, mode="decide", target_radius="0.1", n="2000")
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    other = service.submit(service.alice, png, mode="decide", target_radius="0.2", n="2000")
    assert other.status_code == 202 and other.json()["id"] != job["id"]


def test_service_budgeted_certify_job(service: Service) -> None:  # noqa: F811
    r = service.submit(service.alice, digit_png(4), time_budget_s="30")
    assert r.status_code == 202, r.text
    job = service.wait(service.alice, r.json()["url"])
    assert job["status"] == "succeeded" and job["time_budget_s"] == 30.0
    cert = job["certificate"]
    assert cert["n_used"] == cert["n"] and cert["bound"] == "clopper-pearson"  # budget ample


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"mode": "decide"}, "mode=decide needs target_radius"),
        ({"target_radius": "0.2"}, "target_radius is for mode=decide only"),
        ({"mode": "predict", "time_budget_s": "5"}, "time_budget_s is for mode=certify"),
        ({"mode": "decide", "target_radius": "0.2", "time_budget_s": "5"}, "time_budget_s"),
        ({"time_budget_s": "0"}, "time budget must be a positive number"),
        ({"mode": "decide", "target_radius": "-1"}, "target radius must be a positive"),
        ({"mode": "decide", "target_radius": "nan"}, "target radius must be a positive"),
        ({"mode": "decide", "target_radius": "100"}, "no number of samples can certify"),
        ({"mode": "decide", "target_radius": "0.5", "n": "300"}, "needs n >= 351"),
    ],
)
def test_service_refuses_decide_and_budget_misuse(
    service: Service,  # noqa: F811
    form: dict[str, str],
    message: str,
) -> None:
    r = service.submit(service.alice, digit_png(1), **form)
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
