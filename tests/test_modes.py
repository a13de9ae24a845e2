"""The job modes' one home (models/modes): the registry is complete, each mode keeps today's
checks and messages, a mode registered there reaches the API schema's choices, the page's
config.json and the CLI's choices without editing them, and no mode name is spelt out in more
than three product modules."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_support import service_settings

from domain.config import Settings
from domain.errors import ServiceError
from domain.services.submissions import Params, check_params
from models import modes
from models.modes import MODES, Mode, RunSpec, by_family, get_mode, variant
from models.modes.certify import Certify
from models.modes.predict import Predict
from models.smoothing import BatchSampler

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("app", "cli", "domain", "worker", "models", "bench")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return service_settings(tmp_path / "data", n_max=20_000, n0_max=300)


def test_the_registry_holds_the_four_modes_with_every_hook() -> None:
    assert list(MODES) == ["certify", "predict", "certify_top2", "decide"]  # the API's order
    assert [m.name for m in by_family()] == ["certify", "certify_top2", "predict", "decide"]
    for name, mode in MODES.items():
        assert isinstance(mode, Mode) and mode.name == name and get_mode(name) is mode
        assert mode.family in MODES and MODES[mode.family].family == mode.family
        for hook in ("run", "recompute", "max_radius", "validate", "check_samples",
                     "check_reachable", "selection_samples", "level", "facts"):  # fmt: skip
            assert callable(getattr(mode, hook)), (name, hook)
        assert set(mode.facts()) == {
            "uses_n0", "default_n0", "has_radius", "has_curve", "takes_target_radius",
            "takes_time_budget",
        }  # fmt: skip
    assert variant("certify", True).name == "certify_top2"
    assert variant("certify", False).name == "certify"
    with pytest.raises(ValueError, match="mode must be one of certify, predict, certify_top2"):
        get_mode("certify_top3")


def test_each_mode_states_its_facts() -> None:
    facts = {name: m.facts() for name, m in MODES.items()}
    assert [n for n, f in facts.items() if f["uses_n0"]] == ["certify", "certify_top2", "decide"]
    assert {n: f["default_n0"] for n, f in facts.items()} == {
        "certify": 100, "predict": 0, "certify_top2": 100, "decide": 0,
    }  # fmt: skip
    assert [n for n, f in facts.items() if not f["has_radius"]] == ["predict"]
    assert [n for n, f in facts.items() if f["has_curve"]] == ["certify", "certify_top2"]
    assert [n for n, f in facts.items() if f["takes_target_radius"]] == ["decide"]
    assert [n for n, f in facts.items() if f["takes_time_budget"]] == ["certify", "certify_top2"]
    assert MODES["certify_top2"].level(0.002) == 0.001 and MODES["certify"].level(0.002) == 0.002


def _refusal(p: Params, settings: Settings) -> str:
    with pytest.raises(ServiceError) as info:
        check_params(p, settings)
    assert info.value.status_code == 422
    return str(info.value.detail)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (Params(mode="certify_top3"), "mode must be one of certify, predict, certify_top2, "
         "decide, got 'certify_top3'"),
        (Params(mode="certify", n0=0), "n0 must lie in [1, 300], got 0"),
        (Params(mode="certify_top2", n0=301), "n0 must lie in [1, 300], got 301"),
        (Params(mode="decide", n0=-1, target_radius=0.5), "n0 must lie in [0, 300], got -1"),
        (Params(mode="certify", alpha=0.7), "alpha must lie in [1e-100, 0.5), got 0.7"),
        (Params(mode="decide"), "mode=decide needs target_radius (the radius to decide about)"),
        (Params(mode="certify", target_radius=0.5),
         "target_radius is for mode=decide only, not certify"),
        (Params(mode="predict", time_budget_s=5.0),
         "time_budget_s is for mode=certify or certify_top2, not predict"),
        (Params(mode="certify", n=5), "n=5 is too small for alpha=0.001: CERTIFY can only "
         "certify when alpha^(1/n) > 1/2, which needs n >= 10"),
        (Params(mode="certify_top2", n=10), "n=10 is too small for alpha=0.001: certify_top2"),
        (Params(mode="predict", n=10), "n=10 is too small for alpha=0.001: PREDICT"),
    ],
)  # fmt: skip
def test_each_mode_refuses_bad_parameters_as_before(
    params: Params, message: str, settings: Settings
) -> None:
    assert _refusal(params, settings).startswith(message)


def test_the_modes_accept_their_defaults(settings: Settings) -> None:
    for p in (Params(mode="certify"), Params(mode="certify_top2", time_budget_s=2.0),
              Params(mode="predict"), Params(mode="decide", target_radius=0.25)):  # fmt: skip
        check_params(p, settings)
    assert Params(mode="predict", n0=50).selection_samples() == 0
    assert Params(mode="decide").selection_samples() == 0
    assert Params().selection_samples() == 100


def test_decide_checks_its_target_with_sigma() -> None:
    decide = MODES["decide"]
    with pytest.raises(ValueError, match="target radius must be a positive finite number"):
        decide.check_reachable(1000, 0.001, 0.25, 0, -1.0)
    with pytest.raises(ValueError, match="Phi\\(target/sigma\\) rounds to 1"):
        decide.check_reachable(1000, 0.001, 0.01, 10, 5.0)
    decide.check_reachable(10_000, 0.001, 0.5, 0, 0.25)
    MODES["certify"].check_reachable(10, 0.001, 0.5, 100, None)  # nothing to check


def test_a_spec_replays_a_certificate() -> None:
    body = {"mode": "certify", "sigma": 0.5, "alpha": 0.001, "n0": 100, "n": 1000.0,
            "seed": 7, "n_used": 640}  # fmt: skip
    assert RunSpec.of_certificate(body) == RunSpec("certify", 0.5, 0.001, 100, 1000, 7,
                                                   stop_after=640)  # fmt: skip
    assert RunSpec.of_certificate({**body, "n_used": 1000}).stop_after is None


class Toy(Certify):
    """A made-up mode, to see the registry feed its readers."""

    name = "toy_mode"


TOY_SCHEMA = """
import typing
from models import modes
from models.modes.certify import Certify

class Toy(Certify):
    name = "toy_mode"

modes.register(Toy())
import app.schemas
print(*typing.get_args(app.schemas.Mode))
"""


@pytest.fixture
def toy() -> Iterator[Mode]:
    mode = Toy()
    modes.register(mode)
    try:
        yield mode
    finally:
        del MODES[mode.name]


def test_a_registered_mode_reaches_the_schema_config_and_cli(toy: Mode) -> None:
    from app.routes import web
    from cli import submit

    # The API's Mode type is built from the registry when app.schemas loads: load it in a
    # fresh interpreter (reloading it here would leave two JobOut classes in this process).
    loaded = subprocess.run(
        [sys.executable, "-c", TOY_SCHEMA], capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
    )  # fmt: skip
    assert loaded.returncode == 0 and "toy_mode" in loaded.stdout.split(), loaded.stderr
    config = web.config(service_settings(Path("/nonexistent")))
    assert "toy_mode" in config["modes"] and config["mode_facts"]["toy_mode"]["uses_n0"]
    sub = argparse.ArgumentParser().add_subparsers()
    submit.register(sub)
    choices = next(a.choices for a in sub.choices["submit"]._actions if a.dest == "mode")
    assert choices is not None and "toy_mode" in choices


class StrictPredict(Predict):
    """A variant that reuses PREDICT's core under a name of its own."""

    name = "strict_toy"


def test_a_variant_of_a_mode_is_checked_and_signed_as_itself(known_classifier) -> None:
    """A new mode that reuses another's core procedure keeps that procedure's sample-size
    rule (the old code refused any name the core did not know) and its certificates carry
    its own name (the old code signed the core's), so the verifier re-checks it as itself."""
    mode = StrictPredict()
    assert (mode.family, mode.core) == ("strict_toy", "predict")
    mode.check_samples(100, 0.001)  # PREDICT's rule: 100 samples can answer at 0.001
    with pytest.raises(ValueError, match="needs n >= 11"):
        mode.check_samples(5, 0.001)
    model, x = known_classifier([0.9, 0.05, 0.05], 0.25)
    spec = RunSpec("strict_toy", 0.25, 0.001, 0, 200, seed=3)
    certificate = mode.run(BatchSampler(model, 3, batch_size=100), x, spec)
    assert certificate.mode == "strict_toy" and sum(certificate.counts) == 200


def product_files() -> Iterator[Path]:
    for top in PRODUCT:
        for path in sorted((ROOT / top).rglob("*")):
            if path.suffix in (".py", ".js") and "__pycache__" not in path.parts:
                yield path


# Quoted names that are not a mode there (the word "certify" also names a page view, the
# runner's queue kind and an ablation stage; "predict" a TSV column).
NOT_A_MODE = {
    ("certify", "app/web/static/js/main.js"),
    ("certify", "worker/runner.py"),
    ("certify", "cli/ablation.py"),
    ("predict", "models/evaluate.py"),
}


def spelt_out(name: str, root: Path = ROOT) -> list[str]:
    """The product modules with ``name`` as a quoted string literal."""
    quoted = re.compile(rf"""['"]{re.escape(name)}['"]""")
    return [
        str(path.relative_to(root))
        for path in product_files()
        if quoted.search(path.read_text(encoding="utf-8"))
    ]


@pytest.mark.parametrize("name", ["certify", "certify_top2", "predict", "decide"])
def test_each_mode_name_is_spelt_out_in_at_most_three_modules(name: str) -> None:
    found = [f for f in spelt_out(name) if (name, f) not in NOT_A_MODE]
    assert f"models/modes/{name}.py" in found
    assert len(found) <= 3, found
