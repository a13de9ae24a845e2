"""The training pipeline: schedule, consistency loss, resume, both stages, bundled models."""

from __future__ import annotations

import dataclasses
import math
import shlex
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cli import build_parser
from cli import main as cli_main
from cli.train import _config
from models import networks
from models.checkpoints import (
    OFFICIAL_LICENCE,
    load_classifier_with_meta,
    load_model,
    read_meta,
)
from models.data import DIGITS_MEAN, DIGITS_STD, load_digits_split
from models.networks import ArchConfig, DenoisingMaskedAutoencoderViT
from models.training.consistency import consistency_loss, default_eta
from models.training.datasets import epoch_order, open_training_data, train_transform
from models.training.finetune import (
    FinetuneConfig,
    build_classifier,
    load_pretrained,
    make_step,
    run_finetune,
)
from models.training.loop import resolve_amp
from models.training.pretrain import PretrainConfig, run_pretrain
from models.training.schedule import WarmupCosine, param_groups
from models.training.state import STATE_FILE, STATE_FORMAT, load_state

ARCH = "test-small"


@pytest.fixture(autouse=True)
def small_preset(monkeypatch: pytest.MonkeyPatch, small_arch: ArchConfig) -> None:
    """A ViT small enough to train for a few steps in well under a second."""
    monkeypatch.setitem(networks.PRESETS, ARCH, small_arch)


def pretrain_config(out: Path, **kw: Any) -> PretrainConfig:
    base: dict[str, Any] = dict(
        data="digits:test",
        out=out,
        arch=ARCH,
        epochs=2,
        warmup_epochs=1,
        batch_size=32,
        blr=4e-3,
        progress=False,
        seed=0,
    )
    base.update(kw)
    return PretrainConfig(**base)


def finetune_config(out: Path, pretrained: Path, **kw: Any) -> FinetuneConfig:
    base: dict[str, Any] = dict(
        data="digits:test",
        out=out,
        pretrained=str(pretrained),
        sigma=0.25,
        epochs=2,
        warmup_epochs=0.5,
        batch_size=32,
        blr=4e-3,
        layer_decay=0.9,
        val_fraction=0.2,
        eval_images=4,
        eval_n=20,
        eval_batch=64,
        progress=False,
        seed=0,
    )
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These models are tiny: one thread is as fast, and far faster on a busy shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small DMAE pre-trained for a few epochs on the digits test split."""
    out = tmp_path_factory.mktemp("pretrain")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(networks.PRESETS, ARCH, _small())
        return run_pretrain(pretrain_config(out, epochs=4), log=lambda _: None)


def _small() -> ArchConfig:
    return ArchConfig(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
    )


# ---------------------------------------------------------------- optimiser recipe


def test_warmup_then_half_cycle_cosine() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = WarmupCosine(opt, base_lr=1.0, warmup_steps=4, total_steps=14, min_lr=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(sched.apply())
        assert opt.param_groups[0]["lr"] == lrs[-1]
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)  # the cosine starts at the peak
    mid = 4 + 5  # half-way through the 10 cosine steps: the mean of peak and floor
    assert lrs[mid] == pytest.approx(0.55)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.9)))


def test_param_groups_exclude_biases_norms_and_tokens_and_decay_by_layer() -> None:
    model = DenoisingMaskedAutoencoderViT(_small(), 8)
    groups = param_groups(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "blocks.0.attn.qkv.weight" in decayed and "decoder_pred.weight" in decayed
    assert "patch_embed.proj.weight" in decayed
    for name in (
        "cls_token",
        "mask_token",
        "blocks.0.attn.qkv.bias",
        "blocks.1.norm1.weight",
        "norm.weight",
        "decoder_norm.bias",
    ):
        assert name in plain, name
    # fixed sin-cos embeddings are not trained at all
    assert "pos_embed" not in decayed | plain and "decoder_pos_embed" not in decayed | plain

    clf = networks.DMAEClassifier(_small(), 10, 8)
    layered = param_groups(clf, 0.05, layer_decay=0.5, num_blocks=2)
    scale = {
        names_: g["lr_scale"]
        for g in layered
        for names_ in [n for n, p in clf.named_parameters() if any(p is q for q in g["params"])]
    }
    assert scale["head.weight"] == 1.0 and scale["fc_norm.bias"] == 1.0
    assert scale["blocks.1.mlp.fc1.weight"] == 0.5
    assert scale["blocks.0.mlp.fc1.weight"] == 0.25
    assert scale["patch_embed.proj.weight"] == 0.125 and scale["pos_embed"] == 0.125


# ---------------------------------------------------------------- consistency loss


def test_consistency_loss_equals_hand_computed_value() -> None:
    # two noisy copies of two images, three classes
    logits = [
        [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]],  # copy 1
        [[1.0, 1.0, 0.0], [-1.0, 2.0, 0.0]],  # copy 2
    ]
    labels = [0, 1]
    lbd, eta, ls = 2.0, 0.5, 0.1

    def softmax(z: list[float]) -> list[float]:
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    ce = kl = ent = 0.0
    for b in range(2):
        p = [softmax(logits[i][b]) for i in range(2)]
        target = [ls / 3 + (1 - ls) * (c == labels[b]) for c in range(3)]
        ce += sum(-sum(t * math.log(pi[c]) for c, t in enumerate(target)) for pi in p) / 2
        p_bar = [(p[0][c] + p[1][c]) / 2 for c in range(3)]
        kl += sum(sum(p_bar[c] * math.log(p_bar[c] / pi[c]) for c in range(3)) for pi in p) / 2
        ent += -sum(q * math.log(q) for q in p_bar)
    expected = ce / 2 + lbd * kl / 2 + eta * ent / 2

    res = consistency_loss(torch.tensor(logits), torch.tensor(labels), lbd, eta, ls)
    assert float(res.total) == pytest.approx(expected, rel=1e-6)
    assert res.ce == pytest.approx(ce / 2, rel=1e-6)
    assert res.kl == pytest.approx(kl / 2, rel=1e-6)
    assert res.entropy == pytest.approx(ent / 2, rel=1e-6)


def test_consistency_loss_reduces_to_label_smoothed_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 5, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0])
    res = consistency_loss(logits, y, lbd=2.0, eta=0.0, label_smoothing=0.2)
    assert res.kl == pytest.approx(0.0, abs=1e-7)  # one copy agrees with its own mean
    assert float(res.total) == pytest.approx(
        float(F.cross_entropy(logits[0], y, label_smoothing=0.2)), rel=1e-6
    )
    # identical copies: no KL term, entropy of the common prediction
    twin = consistency_loss(logits.repeat(2, 1, 1), y, lbd=2.0, eta=1.0)
    p = logits[0].softmax(-1)
    assert twin.kl == pytest.approx(0.0, abs=1e-6)
    assert twin.entropy == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-6)
    assert default_eta(0.25) == default_eta(0.5) == 0.5 and default_eta(1.0) == 0.1


# ---------------------------------------------------------------- data order and inputs


def test_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    a = epoch_order(3, 5, 100)
    assert a == epoch_order(3, 5, 100)
    assert a != epoch_order(3, 6, 100) and a != epoch_order(4, 5, 100)
    assert sorted(i for i, _ in a) == list(range(100))


def _image_folder(root: Path, per_class: int = 4, size: int = 20) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)
            arr[..., c] = 255
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def test_image_folder_augmentation_is_seeded_per_sample(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "folder")

    def aug(size: int, mean: tuple[float, ...]) -> Any:
        return train_transform(size, (0.2, 1.0), mean, "rand-m9-mstd0.5-inc1")

    data = open_training_data(str(root), 16, augment=aug)
    assert data.classes == ["cat", "dog"] and len(data) == 8
    assert data.fingerprint.startswith("listing-sha256:")
    torch.manual_seed(1)
    before = torch.get_rng_state()
    x1, y1 = next(data.batches([[(0, 7), (5, 8)]]))
    x2, _ = next(data.batches([[(0, 7), (5, 8)]]))
    x3, _ = next(data.batches([[(0, 9), (5, 10)]]))
    assert x1.shape == (2, 3, 16, 16) and y1.tolist() == [0, 1]
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(before, torch.get_rng_state())  # the run's own RNG is left alone
    plain, _ = next(data.in_order(8))
    assert plain.shape == (8, 3, 16, 16) and 0.0 <= float(plain.min()) <= float(plain.max()) <= 1


# ---------------------------------------------------------------- the two stages


def _pretrain_loss(model: torch.nn.Module, x: torch.Tensor) -> float:
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return float(model(x, generator=g)[0])


def test_pretraining_reduces_the_loss(pretrained_file: Path) -> None:
    x = load_digits_split("test")[0][:128]
    torch.manual_seed(0)
    fresh = DenoisingMaskedAutoencoderViT(_small(), 8, DIGITS_MEAN, DIGITS_STD).eval()
    trained, meta = load_model(pretrained_file)
    assert _pretrain_loss(trained, x) < 0.8 * _pretrain_loss(fresh, x)
    assert meta.kind == "pretrain" and meta.input_size == 8 and meta.sigma == 0.25
    assert meta.mean == DIGITS_MEAN and meta.std == DIGITS_STD
    assert meta.training["dataset"]["fingerprint"].startswith("sha256:")
    assert meta.training["recipe"]["mask_ratio"] == 0.75
    assert meta.training["optimizer"]["betas"] == [0.9, 0.95]


def _noisy_ce(model: torch.nn.Module, sigma: float) -> tuple[float, float]:
    x, y, _ = load_digits_split("train")
    x, y = x[:300], y[:300]
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        logits = model(x + sigma * torch.randn(x.shape, generator=g))
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def test_finetuning_reduces_the_loss_and_records_its_recipe(
    tmp_path: Path, pretrained_file: Path
) -> None:
    lines: list[str] = []
    path = run_finetune(
        finetune_config(
            tmp_path / "ft", pretrained_file, epochs=8, batch_size=16, blr=0.1, name="tiny-test"
        ),
        log=lines.append,
    )
    model, meta = load_classifier_with_meta(path)
    # the fresh head gives uniform predictions: CE = ln 10
    ce, acc = _noisy_ce(model, 0.25)
    assert ce < math.log(10) - 0.3 and acc > 0.25
    assert meta.kind == "classifier" and meta.sigma == 0.25 and meta.name == "tiny-test"
    assert meta.classes == [str(i) for i in range(10)] and meta.input_size == 8
    assert meta.mean == DIGITS_MEAN and meta.licence == ""
    t = meta.training
    assert t["recipe"]["copies"] == 2 and t["recipe"]["lbd"] == 2.0 and t["recipe"]["eta"] == 0.5
    assert t["pretrained"]["kind"] == "pretrain" and len(t["pretrained"]["sha256"]) == 64
    assert t["dataset"]["images"] + t["held_out"]["images"] == 360
    assert {"noisy_acc", "clean_acc", "smoothed_acc", "loss"} <= set(t["final_epoch"])
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert len(epoch_lines) == 8
    assert all(k in epoch_lines[-1] for k in ("loss", "lr", "samples/s", "noisy_acc"))


def test_finetuning_from_an_official_pretrained_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dmae = DenoisingMaskedAutoencoderViT(_small(), 16)
    official = tmp_path / "dmae_small.pth"
    torch.save({"model": dmae.state_dict()}, official)
    cfg = finetune_config(
        tmp_path / "ft", official, epochs=1, num_heads=2, input_size=8, eval_images=0
    )
    pre = load_pretrained(cfg)
    assert pre.official and pre.meta.arch.num_heads == 2
    clf = build_classifier(pre, 10, 8, DIGITS_MEAN, DIGITS_STD, 0.0)
    state, source = clf.state_dict(), dmae.state_dict()
    for key in ("pos_embed", "cls_token", "patch_embed.proj.weight", "blocks.1.mlp.fc2.bias"):
        assert torch.equal(state[key], source[key]), key
    meta = read_meta(run_finetune(cfg, log=lambda _: None))
    assert meta.licence == OFFICIAL_LICENCE  # derived from CC BY-NC weights
    assert meta.arch.num_heads == 2 and meta.input_size == 8 and meta.mean == DIGITS_MEAN


def test_mixup_step_trains_on_soft_targets() -> None:
    cfg = finetune_config(Path("unused"), Path("unused"), mixup=0.8, cutmix=1.0)
    step = make_step(cfg, 10)
    model = networks.DMAEClassifier(_small(), 10, 8)
    x, y, _ = load_digits_split("test")
    loss, parts = step(model, x[:8], y[:8], torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(float(loss.detach())) and parts["ce"] > 0
    assert model.head.weight.grad is not None


# ---------------------------------------------------------------- resume


class Killed(Exception):
    pass


def _kill_at(step: int) -> Any:
    def after_step(s: int) -> None:
        if s == step:
            raise Killed

    return after_step


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_state(path / STATE_FILE)["model"]


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_resume_after_a_kill_continues_bit_for_bit(
    tmp_path: Path, pretrained_file: Path, stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 360 (pretrain) or 324 (finetune) images, batch 32 x 2 accumulation: 5 steps per epoch.
    def config(out: Path) -> Any:
        if stage == "pretrain":
            return pretrain_config(out, epochs=3, accum_iter=2, save_every_steps=1)
        return finetune_config(
            out,
            pretrained_file,
            val_fraction=0.1,
            epochs=3,
            accum_iter=2,
            save_every_steps=1,
            drop_path=0.1,
        )

    run = run_pretrain if stage == "pretrain" else run_finetune
    lrs: list[float] = []
    apply = WarmupCosine.apply

    def recording_apply(self: WarmupCosine) -> float:
        lrs.append(apply(self))
        return lrs[-1]

    monkeypatch.setattr(WarmupCosine, "apply", recording_apply)
    run(config(tmp_path / "straight"), log=lambda _: None)
    straight, straight_lrs = load_state(tmp_path / "straight" / STATE_FILE), list(lrs)
    lrs.clear()

    with pytest.raises(Killed):
        run(config(tmp_path / "resumed"), log=lambda _: None, after_step=_kill_at(7))
    killed = load_state(tmp_path / "resumed" / STATE_FILE)
    assert killed["step"] == 7 and killed["epoch"] == 1  # in the middle of the second epoch
    torch.manual_seed(999)  # whatever ran in between, the saved RNG states take over
    np.random.seed(999)
    with pytest.raises(ValueError, match="--resume"):
        run(config(tmp_path / "resumed"), log=lambda _: None)
    run(replace(config(tmp_path / "resumed"), resume=True), log=lambda _: None)
    resumed = load_state(tmp_path / "resumed" / STATE_FILE)

    assert straight["step"] == resumed["step"] == straight["schedule"]["total_steps"] == 15
    assert len(straight_lrs) == 15 and lrs == straight_lrs  # 7 before the kill, 8 after
    assert resumed["schedule"] == straight["schedule"]
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    opt_a, opt_b = straight["optimizer"]["state"], resumed["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        assert torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"])
    assert torch.equal(straight["rng"]["torch"], resumed["rng"]["torch"])
    assert torch.equal(straight["rng"]["noise"], resumed["rng"]["noise"])


def test_resume_refuses_other_settings_and_foreign_pickles(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_pretrain(pretrain_config(out, epochs=1), log=lambda _: None)
    with pytest.raises(ValueError, match="blr"):
        run_pretrain(pretrain_config(out, epochs=1, blr=1e-3, resume=True), log=lambda _: None)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run_pretrain(pretrain_config(tmp_path / "none", resume=True), log=lambda _: None)

    evil = tmp_path / "evil.pt"
    torch.save({"format": STATE_FORMAT, "payload": Killed()}, evil)
    with pytest.raises(ValueError, match="not a readable training state"):
        load_state(evil)


# ---------------------------------------------------------------- command line


def test_cli_trains_both_stages_on_an_image_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _image_folder(tmp_path / "folder")
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    common = [
        "--data",
        str(root),
        "--input-size",
        "16",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0.5",
        "--num-workers",
        "0",
        "--threads",
        "1",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert cli_main(["train", "pretrain", *common, "--out", str(pre), "--arch", ARCH]) == 0
    assert (
        cli_main(
            [
                "train",
                "finetune",
                *common,
                "--out",
                str(ft),
                "--sigma",
                "0.5",
                "--pretrained",
                str(pre / "checkpoint.safetensors"),
                "--val-data",
                str(root),
                "--randaug",
                "rand-m9-mstd0.5-inc1",
                "--eval-images",
                "2",
                "--eval-n",
                "11",
                "--export",
                str(tmp_path / "exported.safetensors"),
            ]
        )
        == 0
    )
    meta = read_meta(tmp_path / "exported.safetensors")
    assert meta.classes == ["cat", "dog"] and meta.sigma == 0.5 and meta.input_size == 16
    assert meta.training["dataset"]["fingerprint"].startswith("listing-sha256:")
    assert meta.training["command"].startswith("dmae-certify")
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "samples/s" in out

    assert (
        cli_main(
            [
                "train",
                "pretrain",
                "--data",
                str(tmp_path / "missing"),
                "--out",
                str(tmp_path / "x"),
                "--arch",
                ARCH,
            ]
        )
        == 2
    )
    assert (
        "neither a built-in dataset (digits:train|test, mnist:train|test) nor an ImageFolder"
        in (capsys.readouterr().err)
    )
    assert (
        cli_main(
            [
                "train",
                "finetune",
                "--data",
                "digits:test",
                "--out",
                str(tmp_path / "y"),
                "--sigma",
                "0.25",
                "--pretrained",
                str(tmp_path / "nope.pth"),
            ]
        )
        == 2
    )
    assert "no checkpoint file" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_cli_defaults_are_the_config_defaults_and_commands_reproduce_configs(stage: str) -> None:
    required = ["--data", "digits:train", "--out", "run"]
    if stage == "finetune":
        required += ["--pretrained", "p.safetensors", "--sigma", "0.5"]
    cls = PretrainConfig if stage == "pretrain" else FinetuneConfig
    parser = build_parser()
    defaults = _config(parser.parse_args(["train", stage, *required]), cls, stage)
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING and f.name != "command":
            assert getattr(defaults, f.name) == f.default, f.name
    custom = _config(
        parser.parse_args(
            [
                "train",
                stage,
                *required,
                "--mean",
                "0.1,0.2,0.3",
                "--no-augment",
                "--blr",
                "0.002",
                "--epochs",
                "7",
                "--export",
                "m.safetensors",
            ]
        ),
        cls,
        stage,
    )
    again = _config(parser.parse_args(shlex.split(custom.command)[1:]), cls, stage)
    assert again == custom and "--blr 0.002" in custom.command


# ---------------------------------------------------------------- the bundled models


@pytest.mark.parametrize(
    ("name", "sigma", "floor"), [("digits-s0.25", 0.25, 0.8), ("digits-s0.50", 0.5, 0.6)]
)
def test_bundled_model_beats_chance_under_noise(name: str, sigma: float, floor: float) -> None:
    model, meta = load_classifier_with_meta(name)
    assert meta.kind == "classifier" and meta.sigma == sigma and meta.input_size == 8
    assert meta.mean == DIGITS_MEAN and meta.std == DIGITS_STD
    assert meta.classes == [str(i) for i in range(10)]
    assert meta.training["dataset"]["spec"] == "digits:train"
    assert meta.training["dataset"]["fingerprint"].startswith("sha256:")
    x, y, _ = load_digits_split("test")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        pred = model(x + sigma * torch.randn(x.shape, generator=g)).argmax(1)
    accuracy = float((pred == y).float().mean())
    assert accuracy > floor  # chance is 10%


def test_mixed_precision_only_on_cuda() -> None:
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cpu) is None
    for name in ("bf16", "fp16"):
        with pytest.raises(ValueError, match="only used on CUDA"):
            resolve_amp(name, cpu)
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        assert resolve_amp("fp16", cuda) == torch.float16
        assert resolve_amp("auto", cuda) in (torch.bfloat16, torch.float16)
