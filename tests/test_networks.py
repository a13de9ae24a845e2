"""The DMAE networks against docs/DESIGN.md section 1: noise before resize, all-patch loss, sin-cos
position embeddings, patch ordering, masking and the classifier's interface."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor

from models.networks import (
    ArchConfig,
    DenoisingMaskedAutoencoderViT,
    DMAEClassifier,
    encoder_state,
    patchify,
    preset,
    sincos_pos_embed,
    unpatchify,
)


def images(b: int, size: int, seed: int = 0) -> Tensor:
    """[0,1] images with saturated pixels, so clipping after the noise would show."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size, size, generator=g)
    return torch.where(x < 0.3, 0.0, torch.where(x > 0.7, 1.0, x))


# ---------------------------------------------------------------- patches and positions


def test_patchify_orders_patches_row_major_then_pixels_then_channels() -> None:
    img = torch.rand(2, 3, 8, 8)
    p = 4
    patches = patchify(img, p)
    assert patches.shape == (2, 4, p * p * 3)
    for b in range(2):
        for r in range(2):
            for c in range(2):
                for i in range(p):
                    for j in range(p):
                        for ch in range(3):
                            got = patches[b, r * 2 + c, (i * p + j) * 3 + ch]
                            assert got == img[b, ch, r * p + i, c * p + j]


def test_unpatchify_inverts_patchify() -> None:
    img = torch.rand(3, 3, 16, 16)
    assert torch.equal(unpatchify(patchify(img, 4), 4), img)
    assert torch.equal(unpatchify(patchify(img, 8), 8), img)


def test_sincos_position_embedding() -> None:
    dim, grid = 32, 4
    emb = sincos_pos_embed(dim, grid)
    assert emb.shape == (1, 1 + grid * grid, dim)
    assert torch.count_nonzero(emb[0, 0]) == 0  # the cls row is zero
    q = dim // 4
    for r in range(grid):
        for c in range(grid):
            row = emb[0, 1 + r * grid + c]
            for k in range(q):
                omega = 10000 ** (-k / q)
                # MAE convention: first half encodes the column (w), second half the row (h).
                assert row[k] == pytest.approx(math.sin(c * omega), abs=1e-6)
                assert row[q + k] == pytest.approx(math.cos(c * omega), abs=1e-6)
                assert row[2 * q + k] == pytest.approx(math.sin(r * omega), abs=1e-6)
                assert row[3 * q + k] == pytest.approx(math.cos(r * omega), abs=1e-6)
    assert sincos_pos_embed(dim, grid, cls_token=False).shape == (1, grid * grid, dim)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed(30, grid)


def test_models_use_fixed_sincos_embeddings(small_arch: ArchConfig) -> None:
    grid = small_arch.img_size // small_arch.patch_size
    mae = DenoisingMaskedAutoencoderViT(small_arch, input_size=16)
    assert torch.equal(mae.pos_embed, sincos_pos_embed(small_arch.embed_dim, grid))
    assert torch.equal(mae.decoder_pos_embed, sincos_pos_embed(small_arch.decoder_embed_dim, grid))
    assert not mae.pos_embed.requires_grad and not mae.decoder_pos_embed.requires_grad
    clf = DMAEClassifier(small_arch, 10, input_size=16)
    assert clf.pos_embed is not None
    assert torch.equal(clf.pos_embed.detach(), sincos_pos_embed(small_arch.embed_dim, grid))


def test_random_masking_keeps_a_quarter_and_reports_it() -> None:
    b, length, d = 3, 16, 5
    tokens = torch.arange(length, dtype=torch.float32).view(1, length, 1).expand(b, length, d)
    kept, mask, restore = DenoisingMaskedAutoencoderViT.random_masking(
        tokens.contiguous(), 0.75, torch.Generator().manual_seed(0)
    )
    assert kept.shape == (b, length // 4, d)
    assert mask.shape == (b, length) and torch.all(mask.sum(1) == length - length // 4)
    for i in range(b):
        visible = set(torch.nonzero(mask[i] == 0).flatten().tolist())
        assert set(kept[i, :, 0].long().tolist()) == visible
    assert not torch.equal(mask[0], mask[1])  # a per-sample shuffle
    assert torch.equal(torch.sort(restore, 1).values, torch.arange(length).expand(b, length))


# ---------------------------------------------------------------- DMAE pre-training


def test_noise_is_added_at_native_size_before_resize_and_not_clipped(
    small_arch: ArchConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encoder input = normalise(resize(x + sigma * N(0, 1))), noise drawn at the 8x8 input."""
    model = DenoisingMaskedAutoencoderViT(small_arch, input_size=8, sigma=0.5).eval()
    imgs = images(2, 8)
    seen: list[Tensor] = []
    original = model.forward_encoder

    def spy(x: Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(x.detach().clone())
        return original(x, *args, **kwargs)

    monkeypatch.setattr(model, "forward_encoder", spy)
    with torch.no_grad():
        model(imgs, generator=torch.Generator().manual_seed(123))
    noise = torch.randn(imgs.shape, generator=torch.Generator().manual_seed(123))
    expected = model.transform(imgs + 0.5 * noise)
    assert seen[0].shape == (2, 3, 16, 16)
    torch.testing.assert_close(seen[0], expected)
    clipped = model.transform((imgs + 0.5 * noise).clamp(0, 1))
    assert not torch.allclose(seen[0], clipped, atol=1e-3)


def norm_pix_target(clean_model_space: Tensor, p: int) -> Tensor:
    target = patchify(clean_model_space, p)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    return (target - mean) / torch.sqrt(var + 1e-6)


def test_pretraining_loss_is_mse_to_the_clean_target_over_all_patches(
    small_arch: ArchConfig,
) -> None:
    model = DenoisingMaskedAutoencoderViT(small_arch, input_size=16).eval()
    imgs = images(2, 16, seed=1)
    with torch.no_grad():
        loss, pred, mask = model(imgs, generator=torch.Generator().manual_seed(0))
        target = norm_pix_target(model.transform(imgs), small_arch.patch_size)
    per_patch = ((pred - target) ** 2).mean(-1)
    assert pred.shape == target.shape == (2, small_arch.num_patches, 3 * 4 * 4)
    torch.testing.assert_close(loss, per_patch.mean())
    masked_only = (per_patch * mask).sum() / mask.sum()  # what MAE would use
    assert not torch.isclose(loss, masked_only, rtol=1e-4)

    # A visible patch's prediction counts: moving it toward the target lowers the loss.
    b, l_vis = [int(i) for i in torch.nonzero(mask == 0)[0]]
    better = pred.clone()
    better[b, l_vis] = target[b, l_vis]
    clean = model.transform(imgs)
    lower = model.loss(clean, better)
    assert lower < loss
    torch.testing.assert_close(loss - lower, per_patch[b, l_vis] / per_patch.numel())
    assert model.loss(clean, pred) == pytest.approx(float(loss))


def test_pretraining_backpropagates_to_encoder_and_decoder(small_arch: ArchConfig) -> None:
    model = DenoisingMaskedAutoencoderViT(small_arch, input_size=8)
    loss, _, _ = model(images(2, 8), generator=torch.Generator().manual_seed(0))
    loss.backward()
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "decoder_pred.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.count_nonzero(grad) > 0, name


# ---------------------------------------------------------------- classifier


def test_classifier_maps_native_images_to_logits(small_arch: ArchConfig) -> None:
    clf = DMAEClassifier(small_arch, 7, input_size=8).eval()
    with torch.no_grad():
        native = clf(images(5, 8))
        model_size = clf(images(5, 16))
    assert native.shape == model_size.shape == (5, 7)
    assert torch.isfinite(native).all()
    state = clf.state_dict()
    assert "norm.weight" not in state and "fc_norm.weight" in state  # official fine-tuned layout
    assert not any(k.startswith("transform.") for k in state)  # mean/std live in metadata


def test_classifier_pools_patch_tokens_not_cls(small_arch: ArchConfig) -> None:
    """With depth 0 tokens never mix, so the logits ignore the cls token only if the features are
    the mean of the patch tokens (cls excluded), as docs/DESIGN.md specifies."""
    arch = ArchConfig(**{**small_arch.to_dict(), "depth": 0})
    clf = DMAEClassifier(arch, 3, input_size=16).eval()
    x = images(2, 16)
    with torch.no_grad():
        before = clf(x)
        assert clf.cls_token is not None
        clf.cls_token.add_(5.0)
        after = clf(x)
    torch.testing.assert_close(before, after)


def test_encoder_state_initialises_a_classifier(small_arch: ArchConfig) -> None:
    mae = DenoisingMaskedAutoencoderViT(small_arch, input_size=16)
    enc = encoder_state(mae.state_dict())
    assert not any(k.startswith(("norm.", "decoder", "mask_token")) for k in enc)
    clf = DMAEClassifier(small_arch, 4, input_size=16)
    result = clf.load_state_dict(enc, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == [
        "fc_norm.bias",
        "fc_norm.weight",
        "head.bias",
        "head.weight",
    ]
    for key, value in enc.items():
        assert torch.equal(clf.state_dict()[key], value), key


def test_presets() -> None:
    assert preset("base") == ArchConfig()
    assert preset("large").embed_dim == 1024 and preset("large").depth == 24
    assert preset("tiny", depth=2).depth == 2
    with pytest.raises(ValueError, match="unknown architecture preset"):
        preset("huge")
    assert ArchConfig.from_dict({**preset("tiny").to_dict(), "extra": 1}) == preset("tiny")
