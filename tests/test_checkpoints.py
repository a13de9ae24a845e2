"""Checkpoints: the project format, the official DMAE importer (checked against an independent
ViT forward written here) and the refusal of anything that is not plain data."""

from __future__ import annotations

import argparse
import os
import pickle
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from models.checkpoints import (
    OFFICIAL_LICENCE,
    CheckpointError,
    CheckpointMeta,
    infer_arch,
    load_classifier,
    load_classifier_with_meta,
    load_model,
    read_meta,
    save_checkpoint,
)
from models.networks import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArchConfig,
    DenoisingMaskedAutoencoderViT,
    DMAEClassifier,
    encoder_state,
    preset,
)

# ---------------------------------------------------------------- official key layout, by hand


def _t(
    shape: tuple[int, ...], g: torch.Generator, scale: float = 0.05, base: float = 0.0
) -> Tensor:
    return base + scale * torch.randn(shape, generator=g)


def official_encoder(
    g: torch.Generator, img: int, patch: int, dim: int, depth: int, hidden: int
) -> dict[str, Tensor]:
    """Encoder keys exactly as in the official DMAE files (docs/DESIGN.md), random values."""
    n = (img // patch) ** 2
    state = {
        "cls_token": _t((1, 1, dim), g),
        "pos_embed": _t((1, 1 + n, dim), g, 0.2),
        "patch_embed.proj.weight": _t((dim, 3, patch, patch), g, 0.1),
        "patch_embed.proj.bias": _t((dim,), g),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        state |= {
            b + "norm1.weight": _t((dim,), g, 0.1, 1.0),
            b + "norm1.bias": _t((dim,), g),
            b + "attn.qkv.weight": _t((3 * dim, dim), g, 0.15),
            b + "attn.qkv.bias": _t((3 * dim,), g),
            b + "attn.proj.weight": _t((dim, dim), g, 0.1),
            b + "attn.proj.bias": _t((dim,), g),
            b + "norm2.weight": _t((dim,), g, 0.1, 1.0),
            b + "norm2.bias": _t((dim,), g),
            b + "mlp.fc1.weight": _t((hidden, dim), g, 0.1),
            b + "mlp.fc1.bias": _t((hidden,), g),
            b + "mlp.fc2.weight": _t((dim, hidden), g, 0.1),
            b + "mlp.fc2.bias": _t((dim,), g),
        }
    return state


def official_finetuned(
    seed: int, img: int, patch: int, dim: int, depth: int, hidden: int, classes: int
) -> dict[str, Tensor]:
    """Fine-tuned layout: encoder without norm.*, plus fc_norm.* and head.*."""
    g = torch.Generator().manual_seed(seed)
    state = official_encoder(g, img, patch, dim, depth, hidden)
    state |= {
        "fc_norm.weight": _t((dim,), g, 0.1, 1.0),
        "fc_norm.bias": _t((dim,), g),
        "head.weight": _t((classes, dim), g, 0.3),
        "head.bias": _t((classes,), g),
    }
    return state


def official_pretrained(
    seed: int,
    img: int,
    patch: int,
    dim: int,
    depth: int,
    hidden: int,
    ddim: int,
    ddepth: int,
    dhidden: int,
) -> dict[str, Tensor]:
    """Pre-trained layout: encoder incl. norm.*, then the whole decoder."""
    g = torch.Generator().manual_seed(seed)
    n = (img // patch) ** 2
    state = official_encoder(g, img, patch, dim, depth, hidden)
    state |= {"norm.weight": _t((dim,), g, 0.1, 1.0), "norm.bias": _t((dim,), g)}
    state |= {
        "decoder_embed.weight": _t((ddim, dim), g),
        "decoder_embed.bias": _t((ddim,), g),
        "mask_token": _t((1, 1, ddim), g),
        "decoder_pos_embed": _t((1, 1 + n, ddim), g),
    }
    decoder = official_encoder(g, img, patch, ddim, ddepth, dhidden)
    state |= {"decoder_" + k: v for k, v in decoder.items() if k.startswith("blocks.")}
    state |= {
        "decoder_norm.weight": _t((ddim,), g, 0.1, 1.0),
        "decoder_norm.bias": _t((ddim,), g),
        "decoder_pred.weight": _t((patch * patch * 3, ddim), g),
        "decoder_pred.bias": _t((patch * patch * 3,), g),
    }
    return state


def save_official_finetuned(
    path: Path, state: dict[str, Tensor], model: str = "vit_test", **args: object
) -> Path:
    """What the official fine-tuning script writes: model, optimizer, epoch, scaler, args.

    ``model`` is ``args.model``; the default names no known architecture (the test encoders
    are not ViT-B), so heads follow the width / 64 rule."""
    params = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2, 2))]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999))
    torch.stack([p.sum() for p in params]).sum().backward()
    opt.step()
    namespace = argparse.Namespace(
        model=model,
        batch_size=64,
        epochs=100,
        lr=None,
        blr=5e-4,
        layer_decay=0.65,
        drop_path=0.1,
        nb_classes=state["head.weight"].shape[0],
        output_dir="./output_dir",
        dist_url="env://",
        distributed=False,
        global_pool=True,
        **args,
    )
    scaler = {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 17,
    }
    torch.save(
        {
            "model": state,
            "optimizer": opt.state_dict(),
            "epoch": 99,
            "scaler": scaler,
            "args": namespace,
        },
        path,
    )
    return path


# ---------------------------------------------------------------- an independent ViT forward


def reference_logits(
    state: dict[str, Tensor],
    x: Tensor,
    heads: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> Tensor:
    """ViT-with-average-pooling classifier, written from its definition (no timm, no project
    code): bicubic resize to the model size, normalise, patch embedding + cls + positions,
    pre-norm blocks (LayerNorm eps 1e-6, exact GELU), mean of patch tokens, fc_norm, head."""
    dim, _, p, _ = state["patch_embed.proj.weight"].shape
    size = int((state["pos_embed"].shape[1] - 1) ** 0.5) * p
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    t = F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=p)
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([state["cls_token"].expand(t.shape[0], -1, -1), t], 1) + state["pos_embed"]

    def ln(v: Tensor, name: str) -> Tensor:
        return F.layer_norm(v, (dim,), state[name + ".weight"], state[name + ".bias"], 1e-6)

    def lin(v: Tensor, name: str) -> Tensor:
        return F.linear(v, state[name + ".weight"], state[name + ".bias"])

    i = 0
    while f"blocks.{i}.norm1.weight" in state:
        b = f"blocks.{i}."
        h = ln(t, b + "norm1")
        bsz, n, _ = h.shape
        qkv = lin(h, b + "attn.qkv").view(bsz, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-2, -1) / (dim // heads) ** 0.5, dim=-1)
        t = t + lin((att @ v).transpose(1, 2).reshape(bsz, n, dim), b + "attn.proj")
        t = t + lin(F.gelu(lin(ln(t, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
        i += 1
    return lin(ln(t[:, 1:].mean(1), "fc_norm"), "head")


def inputs(b: int, size: int, seed: int = 0) -> Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- official importer


@pytest.mark.parametrize(
    ("img", "patch", "dim", "depth", "hidden", "classes"),
    [(16, 4, 128, 2, 512, 10), (32, 8, 64, 3, 128, 3), (24, 6, 192, 1, 768, 1000)],
)
def test_official_finetuned_file_reproduces_reference_logits(
    tmp_path: Path, img: int, patch: int, dim: int, depth: int, hidden: int, classes: int
) -> None:
    state = official_finetuned(1, img, patch, dim, depth, hidden, classes)
    path = save_official_finetuned(tmp_path / "checkpoint-99.pth", state, sigma=0.5)
    model, meta = load_classifier_with_meta(path)
    x = inputs(4, img)
    with torch.no_grad():
        got = model(x)
    want = reference_logits(state, x, dim // 64, IMAGENET_MEAN, IMAGENET_STD)
    assert got.shape == (4, classes)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.std() > 0.1  # the logits are informative, not a degenerate constant
    torch.testing.assert_close(load_classifier(path)(x), got)

    assert meta.kind == "classifier"
    assert meta.arch == ArchConfig(
        img_size=img,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=dim // 64,
        mlp_ratio=hidden / dim,
    )
    if classes == 1000:  # ImageNet mean/std and 1000 classes: the ImageNet names, said so
        assert meta.classes[0] == "tench, Tinca tinca" and "ImageNet" in meta.classes_source
    else:
        assert meta.classes == [str(i) for i in range(classes)]
    assert meta.num_classes == classes and len(meta.classes) == classes
    assert meta.input_size == img and meta.sigma == 0.5
    assert meta.licence == OFFICIAL_LICENCE and "CC BY-NC" in meta.licence
    assert meta.training["epochs"] == 100 and meta.training["model"] == "vit_test"
    assert meta.weights_sha256


def test_official_cifar_style_import_resizes_and_uses_the_given_statistics(
    tmp_path: Path,
) -> None:
    """A CIFAR model: 32x32 inputs resized to the model's resolution, CIFAR mean/std."""
    state = official_finetuned(2, 64, 16, 128, 2, 512, 10)
    path = save_official_finetuned(tmp_path / "cifar.pth", state)
    names = [f"c{i}" for i in range(10)]
    model, meta = load_classifier_with_meta(
        path, input_size=32, mean=CIFAR_MEAN, std=CIFAR_STD, classes=names
    )
    assert meta.input_size == 32 and meta.arch.img_size == 64 and meta.classes == names
    assert meta.mean == CIFAR_MEAN and meta.std == CIFAR_STD and meta.sigma is None
    x = inputs(3, 32, seed=1)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, reference_logits(state, x, 2, CIFAR_MEAN, CIFAR_STD))
    imagenet = reference_logits(state, x, 2, IMAGENET_MEAN, IMAGENET_STD)
    assert not torch.allclose(got, imagenet, atol=1e-3)
    with pytest.raises(CheckpointError, match="3 class names given for a 10-class head"):
        load_classifier(path, classes=["a", "b", "c"])


def _meta_state(img: int, patch: int, dim: int, depth: int, hidden: int) -> dict[str, Tensor]:
    """Shapes only (meta device): a full-size layout without allocating its weights."""
    n = (img // patch) ** 2
    state = {
        "cls_token": torch.empty(1, 1, dim, device="meta"),
        "pos_embed": torch.empty(1, 1 + n, dim, device="meta"),
        "patch_embed.proj.weight": torch.empty(dim, 3, patch, patch, device="meta"),
    }
    for i in range(depth):
        state[f"blocks.{i}.mlp.fc1.weight"] = torch.empty(hidden, dim, device="meta")
        state[f"blocks.{i}.norm1.weight"] = torch.empty(dim, device="meta")
    return state


def test_infer_arch_recognises_the_published_models() -> None:
    base = _meta_state(224, 16, 768, 12, 3072) | {"head.weight": torch.empty(1000, 768)}
    assert infer_arch(base) == preset("base")
    large = _meta_state(224, 16, 1024, 24, 4096)
    for i in range(8):
        large[f"decoder_blocks.{i}.norm1.weight"] = torch.empty(512, device="meta")
    large["decoder_embed.weight"] = torch.empty(512, 1024, device="meta")
    assert infer_arch(large) == preset("large")
    cifar_small = _meta_state(32, 4, 384, 12, 1536)
    arch = infer_arch(cifar_small, num_heads=6)
    assert (arch.img_size, arch.patch_size, arch.embed_dim, arch.depth, arch.num_heads) == (
        32,
        4,
        384,
        12,
        6,
    )
    assert arch.num_patches == 64 and arch.mlp_ratio == 4.0


def test_infer_arch_rejects_what_is_not_a_vit() -> None:
    with pytest.raises(CheckpointError, match="missing 'pos_embed'"):
        infer_arch({"patch_embed.proj.weight": torch.empty(8, 3, 4, 4)})
    gap = _meta_state(16, 4, 64, 3, 128)
    del gap["blocks.1.mlp.fc1.weight"], gap["blocks.1.norm1.weight"]
    with pytest.raises(CheckpointError, match="not contiguous"):
        infer_arch(gap)
    odd = _meta_state(16, 4, 64, 1, 128)
    odd["pos_embed"] = torch.empty(1, 1 + 15, 64, device="meta")
    with pytest.raises(CheckpointError, match="square"):
        infer_arch(odd)


def test_official_pretrained_file_imports_encoder_and_decoder(tmp_path: Path) -> None:
    state = official_pretrained(4, 16, 4, 64, 2, 256, 32, 2, 128)  # decoder mlp ratio = encoder's
    path = tmp_path / "dmae_pretrain.pth"
    torch.save({"model": state}, path)
    model, meta = load_model(path)
    assert isinstance(model, DenoisingMaskedAutoencoderViT) and meta.kind == "pretrain"
    assert (meta.arch.embed_dim, meta.arch.depth, meta.arch.decoder_embed_dim) == (64, 2, 32)
    assert meta.arch.decoder_depth == 2 and meta.arch.decoder_num_heads == 16  # official: 16
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    loss, _, _ = model(inputs(2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)

    clf = DMAEClassifier(meta.arch, 5, input_size=16)
    missing = clf.load_state_dict(encoder_state(loaded), strict=False).missing_keys
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    clf_state = clf.state_dict()
    for key, value in state.items():
        if key.startswith(("cls_token", "pos_embed", "patch_embed.", "blocks.")):
            assert torch.equal(clf_state[key], value), key

    with pytest.raises(CheckpointError, match="pre-training checkpoint has no classification"):
        load_classifier(path)


def test_official_files_of_the_wrong_shape_are_refused(tmp_path: Path) -> None:
    state = official_finetuned(5, 16, 4, 64, 2, 128, 3)
    del state["blocks.1.attn.proj.bias"]
    path = save_official_finetuned(tmp_path / "broken.pth", state)
    with pytest.raises(CheckpointError, match="weights do not match the architecture"):
        load_classifier(path)
    torch.save({"model": {"pos_embed": torch.zeros(1, 17, 8)}}, tmp_path / "neither.pth")
    with pytest.raises(CheckpointError, match="neither a fine-tuned"):
        load_classifier(tmp_path / "neither.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="expected an official DMAE file"):
        load_classifier(tmp_path / "other.pth")


# ---------------------------------------------------------------- project format


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_project_checkpoint_round_trip(tmp_path: Path, small_arch: ArchConfig) -> None:
    model = _perturbed(DMAEClassifier(small_arch, 3, 8, CIFAR_MEAN, CIFAR_STD), 0)
    meta = CheckpointMeta(
        kind="classifier",
        arch=small_arch,
        input_size=8,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        num_classes=3,
        classes=["cat", "dog", "eel"],
        sigma=0.25,
        name="pets",
        training={"epochs": 3, "lambda": 2.0},
    )
    path = tmp_path / "sub" / "pets.safetensors"
    save_checkpoint(path, model, meta)
    loaded, got = load_classifier_with_meta(path)
    x = inputs(4, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert got == meta and read_meta(path) == meta
    assert got.class_name(1) == "dog" and got.class_name(None) is None
    assert torch.equal(load_model(str(path))[0](x), model(x))


def test_project_pretrain_checkpoint_round_trip(tmp_path: Path, small_arch: ArchConfig) -> None:
    model = _perturbed(DenoisingMaskedAutoencoderViT(small_arch, 16, sigma=0.5), 1)
    meta = CheckpointMeta(kind="pretrain", arch=small_arch, input_size=16, sigma=0.5)
    path = tmp_path / "pre.safetensors"
    save_checkpoint(path, model, meta)
    loaded, got = load_model(path)
    assert isinstance(loaded, DenoisingMaskedAutoencoderViT) and got.sigma == 0.5
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match="pre-training checkpoint"):
        load_classifier(path)


@pytest.fixture
def saved_classifier(tmp_path: Path, small_arch: ArchConfig) -> Path:
    model = _perturbed(DMAEClassifier(small_arch, 2, 16), 2)
    meta = CheckpointMeta(kind="classifier", arch=small_arch, input_size=16, num_classes=2)
    path = tmp_path / "clf.safetensors"
    save_checkpoint(path, model, meta)
    return path


def test_corrupted_weights_are_refused(saved_classifier: Path) -> None:
    data = bytearray(saved_classifier.read_bytes())
    data[-10] ^= 0x01  # one bit of the last tensor
    saved_classifier.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_classifier(saved_classifier)


def test_truncated_project_file_is_refused(saved_classifier: Path) -> None:
    data = saved_classifier.read_bytes()
    saved_classifier.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(saved_classifier.name)):
        load_classifier(saved_classifier)


def test_metadata_that_does_not_fit_the_weights_is_refused(
    tmp_path: Path, small_arch: ArchConfig
) -> None:
    model = DMAEClassifier(small_arch, 2, 16)
    wrong = ArchConfig(**{**small_arch.to_dict(), "depth": small_arch.depth + 1})
    path = tmp_path / "wrong.safetensors"
    save_checkpoint(path, model, CheckpointMeta("classifier", wrong, 16, num_classes=2))
    with pytest.raises(CheckpointError, match="weights do not match the architecture"):
        load_classifier(path)


def test_safetensors_without_project_metadata_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="no 'dmae_certify' metadata"):
        load_classifier(path)


# ---------------------------------------------------------------- data, never code


class Payload:
    """Pickles as a call to os.system: whoever unpickles it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _write_malicious(kind: str, path: Path, marker: Path) -> None:
    state = official_finetuned(6, 16, 4, 64, 1, 128, 2)
    if kind == "in_model":
        torch.save({"model": {**state, "extra": Payload(marker)}}, path)
    elif kind == "in_args":
        torch.save({"model": state, "args": Payload(marker)}, path)
    elif kind == "legacy_format":
        torch.save(
            {"model": state, "args": Payload(marker)}, path, _use_new_zipfile_serialization=False
        )
    else:  # a bare pickle, no torch container at all
        with open(path, "wb") as f:
            pickle.dump({"model": Payload(marker)}, f, protocol=2)


@pytest.mark.parametrize("kind", ["in_model", "in_args", "legacy_format", "bare_pickle"])
def test_pickled_code_is_refused_and_never_runs(tmp_path: Path, kind: str) -> None:
    path, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    _write_malicious(kind, path, marker)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused") as err:
        load_classifier(path)
    assert not marker.exists(), "the pickled payload was executed"
    message = str(err.value)
    assert str(path) in message and "system" in message  # names the blocked callable
    assert "weights_only" not in message  # no advice to load it unsafely
    if kind != "bare_pickle":  # the payload is live: an unsafe load would have run it
        torch.load(path, weights_only=False)
        assert marker.exists()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello, this is not a checkpoint\n",
        bytes(range(256)) * 64,
        b"\x10\0\0\0\0\0\0\0{garbage",
    ],
    ids=["empty", "text", "binary", "fake-safetensors-header"],
)
def test_garbage_files_get_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_classifier(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message and "weights_only" not in message
    assert "refused" in message or "not a readable safetensors file" in message


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint file .* and no bundled model"):
        load_classifier(tmp_path / "absent.safetensors")
