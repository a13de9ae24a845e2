"""The baselines in the training pipeline: MAE pre-training (sigma 0), training from scratch,
Cohen et al.'s Gaussian augmentation, the recipe names checkpoints record, and the validation
of training parameters given as a mapping (the admin API's)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from cli import main as cli_main
from models import networks
from models.checkpoints import load_classifier_with_meta, read_meta
from models.data import DIGITS_MEAN, DIGITS_STD, load_digits_split
from models.networks import ArchConfig, DenoisingMaskedAutoencoderViT, encoder_state, patchify
from models.training.finetune import FinetuneConfig, make_step, random_encoder, run_finetune
from models.training.loop import _comparable
from models.training.params import check_training_params
from models.training.pretrain import PretrainConfig, run_pretrain
from models.training.recipes import finetune_method, pretrain_recipe_name, recipe_name_of
from models.training.state import config_differences

ARCH = "test-small"


@pytest.fixture(autouse=True)
def small_preset(monkeypatch: pytest.MonkeyPatch, small_arch: ArchConfig) -> None:
    monkeypatch.setitem(networks.PRESETS, ARCH, small_arch)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pretrain_config(out: Path, **kw: Any) -> PretrainConfig:
    base: dict[str, Any] = dict(
        data="digits:test", out=out, arch=ARCH, epochs=1, warmup_epochs=0, batch_size=32,
        blr=4e-3, progress=False,
    )  # fmt: skip
    return PretrainConfig(**{**base, **kw})


def finetune_config(out: Path, pretrained: str, **kw: Any) -> FinetuneConfig:
    base: dict[str, Any] = dict(
        data="digits:test", out=out, pretrained=pretrained, sigma=0.25, epochs=1,
        warmup_epochs=0, batch_size=32, blr=4e-3, layer_decay=0.9, val_fraction=0.2,
        eval_images=0, progress=False,
    )  # fmt: skip
    return FinetuneConfig(**{**base, **kw})


def quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------- MAE = DMAE at sigma 0


def test_sigma_zero_feeds_the_clean_image_and_masked_loss_is_maes(small_arch: ArchConfig) -> None:
    x = load_digits_split("test")[0][:16]
    torch.manual_seed(0)
    model = DenoisingMaskedAutoencoderViT(small_arch, 8, DIGITS_MEAN, DIGITS_STD, sigma=0.0)
    model.eval()
    with torch.no_grad():
        loss_all, pred, mask = model(x, generator=torch.Generator().manual_seed(5))
        loss_masked = model(x, generator=torch.Generator().manual_seed(5), loss_on="masked")[0]
        # MAE written out: encode the clean image under the same masking draw (the model
        # draws its noise first, so skip that many numbers), decode, norm-pix target.
        g = torch.Generator().manual_seed(5)
        torch.randn(x.shape, generator=g)
        clean = model.transform(x)
        latent, mae_mask, ids_restore = model.forward_encoder(clean, 0.75, g)
        mae_pred = model.forward_decoder(latent, ids_restore)
        noisy_pred = model(x, generator=torch.Generator().manual_seed(5))[1]
        model.sigma = 0.25
        noised = model(x, generator=torch.Generator().manual_seed(5))[1]
    assert torch.equal(mask, mae_mask) and torch.equal(pred, mae_pred)  # the clean image
    assert torch.equal(noisy_pred, pred) and not torch.allclose(noised, pred)
    target = patchify(clean, small_arch.patch_size)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((mae_pred - target) ** 2).mean(-1)
    assert int(mask.sum()) == 16 * 12  # 75% of 16 patches in each of 16 images
    assert float(loss_masked) == pytest.approx(float(per_patch[mask.bool()].mean()), rel=1e-6)
    assert float(loss_all) == pytest.approx(float(per_patch.mean()), rel=1e-6)
    assert abs(float(loss_all) - float(loss_masked)) > 1e-3  # visible patches are easier
    with pytest.raises(ValueError, match="loss_on"):
        model(x, loss_on="visible")


# ---------------------------------------------------------------- recipe names


def test_recipe_names() -> None:
    assert pretrain_recipe_name(0.25, "all") == "dmae"
    assert pretrain_recipe_name(0.0, "masked") == "mae"
    assert pretrain_recipe_name(0.0, "all") == "mae-all-patches"
    assert pretrain_recipe_name(0.5, "masked") == "dmae-masked-loss"
    assert finetune_method(2, 2.0, 0.5) == "consistency"
    assert finetune_method(2, 2.0, 0.0) == "consistency"  # the KL term remains
    assert finetune_method(1, 0.0, 0.5) == "consistency"  # the entropy term remains
    for copies, lbd in ((1, 0.0), (1, 2.0), (3, 0.0)):  # no KL: one copy or lambda 0
        assert finetune_method(copies, lbd, 0.0) == "gaussian"
    # checkpoints written before the name was recorded: derived from their records
    for name in ("digits-s0.25", "digits-s0.50"):
        training = read_meta(_bundled(name)).training
        assert "recipe_name" not in training
        assert recipe_name_of(training) == "dmae+consistency"
    assert recipe_name_of({}) is None


def _bundled(name: str) -> Path:
    from models.checkpoints import resolve

    return resolve(name)


# ---------------------------------------------------------------- from scratch, Cohen


def test_random_encoder_is_the_initialisation_pretraining_starts_from(
    small_arch: ArchConfig,
) -> None:
    torch.manual_seed(3)
    start = encoder_state(DenoisingMaskedAutoencoderViT(small_arch, 8).state_dict())
    rng = torch.get_rng_state()
    enc = random_encoder(ARCH, 8, seed=3)
    assert torch.equal(rng, torch.get_rng_state())  # the run's own RNG is left alone
    assert enc.scratch and enc.recipe_name == "scratch" and enc.record["kind"] == "none"
    assert start.keys() == enc.state.keys()
    assert all(torch.equal(start[k], enc.state[k]) for k in start)
    other = random_encoder(ARCH, 8, seed=4).state
    assert not torch.equal(other["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])


def test_gaussian_step_is_plain_cross_entropy_on_noisy_inputs(small_arch: ArchConfig) -> None:
    cfg = finetune_config(
        Path("unused"), "none", sigma=0.5, copies=1, lbd=0.0, eta=0.0, label_smoothing=0.0
    )
    assert cfg.method == "gaussian"
    model = networks.DMAEClassifier(small_arch, 10, 8)
    x, y, _ = load_digits_split("test")
    x, y = x[:12], y[:12]
    loss, parts = make_step(cfg, 10)(model, x, y, torch.Generator().manual_seed(9))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    expected = F.cross_entropy(model(x + 0.5 * noise), y)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert parts["kl"] == pytest.approx(0.0, abs=1e-7)
    # the default step (consistency, label smoothing) is a different loss on the same draw
    consistency = make_step(finetune_config(Path("unused"), "none", sigma=0.5), 10)
    other, _ = consistency(model, x, y, torch.Generator().manual_seed(9))
    assert abs(float(other.detach()) - float(expected.detach())) > 1e-3


def _noisy_ce(model: torch.nn.Module, sigma: float) -> float:
    x, y, _ = load_digits_split("train")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        return float(
            F.cross_entropy(
                model(x[:300] + sigma * torch.randn(x[:300].shape, generator=g)), y[:300]
            )
        )


def test_training_from_scratch_and_from_mae_record_their_recipes(tmp_path: Path) -> None:
    cohen = run_finetune(
        finetune_config(
            tmp_path / "cohen", "none", arch=ARCH, copies=1, lbd=0.0, eta=0.0,
            label_smoothing=0.0, epochs=8, batch_size=16, blr=0.1,
        ),
        log=quiet,
    )  # fmt: skip
    model, meta = load_classifier_with_meta(cohen)
    assert _noisy_ce(model, 0.25) < math.log(10) - 0.3  # learnt: a fresh head gives ln 10
    t = meta.training
    assert t["recipe_name"] == "scratch+gaussian" and t["pretrained"]["kind"] == "none"
    assert t["recipe"]["arch"] == ARCH and meta.arch == networks.PRESETS[ARCH]
    assert meta.mean == DIGITS_MEAN and meta.input_size == 8 and meta.licence == ""

    scratch = read_meta(run_finetune(finetune_config(tmp_path / "c", "none", arch=ARCH), log=quiet))
    assert scratch.training["recipe_name"] == "scratch+consistency"

    mae = run_pretrain(pretrain_config(tmp_path / "mae", sigma=0.0, loss_on="masked"), log=quiet)
    mae_meta = read_meta(mae)
    assert mae_meta.training["recipe_name"] == "mae" and mae_meta.sigma == 0.0
    assert mae_meta.training["recipe"]["loss_on"] == "masked"
    tuned = read_meta(run_finetune(finetune_config(tmp_path / "b", str(mae)), log=quiet))
    assert tuned.training["recipe_name"] == "mae+consistency"
    assert tuned.training["pretrained"]["recipe_name"] == "mae"


def test_cli_from_scratch_and_its_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--data", "digits:test", "--epochs", "1", "--warmup-epochs", "0", "--batch-size",
              "32", "--eval-images", "0", "--no-progress", "--threads", "1"]  # fmt: skip
    out = tmp_path / "scratch"
    argv = ["train", "finetune", *common, "--pretrained", "none", "--arch", ARCH, "--sigma", "0.5"]
    assert cli_main([*argv, "--copies", "1", "--lbd", "0", "--eta", "0", "--out", str(out)]) == 0
    meta = read_meta(out / "checkpoint.safetensors")
    assert meta.training["recipe_name"] == "scratch+gaussian"
    assert "--pretrained none" in meta.training["command"]
    assert "fine-tuning (scratch+gaussian)" in capsys.readouterr().out

    def error(argv: list[str]) -> str:
        assert cli_main(argv) == 2
        return capsys.readouterr().err

    ckpt = str(out / "checkpoint.safetensors")
    base = ["train", "finetune", *common, "--sigma", "0.5", "--out", str(tmp_path / "x")]
    assert "applies to --pretrained none only" in error(
        [*base, "--pretrained", ckpt, "--arch", ARCH]
    )
    assert "unknown architecture preset" in error([*base, "--pretrained", "none", "--arch", "nope"])
    pre = ["train", "pretrain", *common[:-5], "--arch", ARCH, "--out", str(tmp_path / "y")]
    assert "--mask-ratio above 0" in error([*pre, "--loss-on", "masked", "--mask-ratio", "0"])
    assert "--sigma must be non-negative" in error([*pre, "--sigma", "-0.1"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_help_says_what_sigma_zero_is(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["train", "pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "MAE" in text and "--loss-on" in text and "masked ones only" in text
    with pytest.raises(SystemExit):
        cli_main(["train", "finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "'none'" in text and "Cohen" in text


# ---------------------------------------------------------------- resume across versions


def test_runs_saved_before_new_settings_resume() -> None:
    old = {"sigma": 0.25, "batch_size": 64, "accum_iter": 2, "blr": 1e-3}
    new = {**old, "loss_on": "all", "effective_batch": 128}
    assert config_differences(_comparable(old), _comparable(new)) == []
    split = {**new, "batch_size": 32, "accum_iter": 4}  # another split of the same 128
    assert config_differences(_comparable(old), _comparable(split)) == []
    masked = {**new, "loss_on": "masked"}
    assert config_differences(_comparable(old), _comparable(masked)) != []
    assert config_differences(_comparable(old), _comparable({**new, "effective_batch": 64}))


# ---------------------------------------------------------------- API parameter checks


def _rejected(kind: str, params: dict[str, Any], **kw: Any) -> str:
    with pytest.raises(ValueError) as info:
        check_training_params(kind, params, **kw)
    message = str(info.value)
    assert "--" not in message  # parameter names, not command-line flags
    return message


def test_training_params_accept_what_the_pipeline_runs() -> None:
    check_training_params("pretrain", {})
    check_training_params(
        "pretrain", {"loss_on": "masked", "epochs": 5, "warmup_epochs": 1}, sigma=0.0
    )
    check_training_params(
        "finetune",
        {"arch": "digits", "copies": 1, "lbd": 0, "eta": 0.0, "label_smoothing": 0,
         "mean": "0.3,0.3,0.3", "std": [0.4, 0.4, 0.4], "amp": "off", "batch_size": 16},
        sigma=0.5, init="none",
    )  # fmt: skip
    check_training_params("finetune", {"layer_decay": 0.75, "epochs": 30}, sigma=0.25, init="m")


@pytest.mark.parametrize(
    ("kind", "params", "kw", "message"),
    [
        ("pretrain", {"foo": 1}, {}, "unknown pretrain parameter(s) foo; accepted: "),
        ("finetune", {"data": "/etc"}, {"sigma": 0.25, "init": "m"}, "unknown finetune"),
        ("finetune", {"val_data": "/etc"}, {"sigma": 0.25, "init": "m"}, "val_data"),
        ("pretrain", {"threads": 64}, {}, "unknown pretrain parameter(s) threads"),
        ("pretrain", {"epochs": "10"}, {}, "epochs must be a whole number, got '10'"),
        ("pretrain", {"epochs": 2.5}, {}, "epochs must be a whole number"),
        ("pretrain", {"batch_size": True}, {}, "batch_size must be a whole number"),
        ("pretrain", {"epochs": 0}, {}, "epochs must be at least 1"),
        ("pretrain", {"blr": float("inf")}, {}, "blr must be a finite non-negative number"),
        ("pretrain", {"augment": 1}, {}, "augment must be true or false"),
        ("pretrain", {"mean": "0.1,0.2"}, {}, "mean must be 3 finite numbers"),
        ("pretrain", {"std": "0,1,1"}, {}, "std must be positive"),
        ("pretrain", {"loss_on": "masked", "mask_ratio": 0}, {}, "set mask_ratio above 0"),
        ("pretrain", {"loss_on": "visible"}, {}, "loss_on must be one of all, masked"),
        ("pretrain", {"warmup_epochs": 50, "epochs": 10}, {}, "warmup_epochs (50) must be within"),
        ("pretrain", {"amp": "fp8"}, {}, "amp must be one of auto, bf16, fp16, off"),
        ("pretrain", {}, {"sigma": -0.5}, "sigma must be non-negative"),
        ("finetune", {}, {"sigma": 0.0, "init": "m"}, "sigma must be positive"),
        ("finetune", {}, {"init": "m"}, "fine-tuning needs sigma"),
        ("finetune", {}, {"sigma": 0.25}, "fine-tuning needs init"),
        ("finetune", {"arch": "digits"}, {"sigma": 0.25, "init": "m"}, "init 'none' only"),
        ("finetune", {"arch": "huge"}, {"sigma": 0.25, "init": "none"}, "unknown architecture"),
        ("finetune", {"layer_decay": 2}, {"sigma": 0.25, "init": "m"}, "layer_decay must lie"),
        ("finetune", {"mixup_prob": 1.5}, {"sigma": 0.25, "init": "m"}, "mixup_prob must lie"),
        ("finetune", {"mixup": 0.8, "batch_size": 3}, {"sigma": 0.5, "init": "m"}, "even batch"),
        ("evaluate", {}, {}, "training kind must be one of pretrain, finetune"),
    ],
)
def test_training_params_refuse_with_a_sentence(
    kind: str, params: dict[str, Any], kw: dict[str, Any], message: str
) -> None:
    assert message in _rejected(kind, params, **kw)
