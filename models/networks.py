"""DMAE networks: the denoising masked autoencoder (pre-training) and the smoothing classifier.

Both take images in [0, 1] pixel space at their *native* input size and do the bicubic resize
to the model resolution and the mean/std normalisation inside (docs/DESIGN.md section 1). Parameter
names follow the official DMAE key layout exactly, so official state dicts load unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers.patch_embed import PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class ArchConfig:
    """ViT encoder/decoder shape. ``img_size`` is the model resolution (after the resize)."""

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchConfig:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


PRESETS: dict[str, ArchConfig] = {
    # CPU-trainable: 8x8 digits upsampled to 16x16, 16 patches of 4x4.
    "tiny": ArchConfig(
        img_size=16,
        patch_size=4,
        embed_dim=64,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
    # The bundled digits models: 8x8 inputs at native size (no resize), 16 patches of 2x2;
    # about 0.6 s per 10,000 noisy samples on 2 CPU cores.
    "digits": ArchConfig(
        img_size=8,
        patch_size=2,
        embed_dim=64,
        depth=4,
        num_heads=4,
        mlp_ratio=2.0,
        decoder_embed_dim=64,
        decoder_depth=2,
        decoder_num_heads=4,
    ),
    "base": ArchConfig(),  # ViT-B/16, 86M encoder parameters
    "large": ArchConfig(embed_dim=1024, depth=24, num_heads=16),  # ViT-L/16
}


def preset(name: str, **overrides: Any) -> ArchConfig:
    """Return a named architecture preset, optionally with fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown architecture preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# The encoder shape a training run may set beside its preset (``--img-size`` ...): the model
# resolution, patch side, width, depth and attention heads. The decoder keeps the preset's.
SHAPE_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")


def shaped(name: str, **shape: int | None) -> ArchConfig:
    """Preset ``name`` with the given :data:`SHAPE_FIELDS` replaced (None: the preset's).

    ValueError (naming the command-line flag) unless every value is a positive whole number,
    the patch side divides the model resolution, the heads divide the width and the width is a
    multiple of 4 (the 2-D sin-cos position embedding needs it).
    """
    unknown = sorted(set(shape) - set(SHAPE_FIELDS))
    if unknown:
        raise ValueError(f"unknown shape field(s) {', '.join(unknown)}")
    given = {k: v for k, v in shape.items() if v is not None}
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive whole number")
    arch = preset(name, **given)
    if arch.img_size % arch.patch_size:
        raise ValueError(
            f"--patch-size {arch.patch_size} must divide the model resolution "
            f"--img-size {arch.img_size}"
        )
    if arch.embed_dim % 4:
        raise ValueError(f"--embed-dim must be a multiple of 4, got {arch.embed_dim}")
    if arch.embed_dim % arch.num_heads:
        raise ValueError(
            f"--num-heads {arch.num_heads} must divide the width --embed-dim {arch.embed_dim}"
        )
    return arch


class _LayerNorm(nn.LayerNorm):
    """LayerNorm with eps 1e-6, as in the official DMAE/MAE models."""

    def __init__(self, dim: int, **kwargs: Any):
        super().__init__(dim, eps=1e-6, **kwargs)


def sincos_pos_embed(dim: int, grid: int, cls_token: bool = True) -> Tensor:
    """Fixed 2-D sin-cos position embedding [1, (1+)grid*grid, dim]; a zero row for cls."""
    if dim % 4:
        raise ValueError("embedding width must be divisible by 4 for 2-D sin-cos embeddings")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    # MAE convention: the first half encodes the w coordinate, the second half h.
    parts = []
    for pos in (gh.reshape(-1), gw.reshape(-1)):
        out = np.einsum("m,d->md", pos, omega)
        parts.append(np.concatenate([np.sin(out), np.cos(out)], axis=1))
    emb = np.concatenate(parts, axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


class InputTransform(nn.Module):
    """[0,1] image at native size -> bicubic resize to model size -> mean/std normalisation."""

    mean: Tensor
    std: Tensor

    def __init__(self, img_size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.img_size = img_size
        # Not persistent: state dicts keep the official key layout; mean/std live in metadata.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(
                x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False
            )
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class DMAEClassifier(VisionTransformer):
    """Encoder + mean of patch tokens + ``fc_norm`` + head; input [0,1] at native size.

    This is timm's ``VisionTransformer(global_pool='avg', class_token=True, fc_norm=True)``
    whose forward first resizes and normalises, so it is the base classifier for smoothing.
    """

    def __init__(
        self,
        arch: ArchConfig,
        num_classes: int,
        input_size: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        drop_path_rate: float = 0.0,
    ):
        super().__init__(
            img_size=arch.img_size,
            patch_size=arch.patch_size,
            embed_dim=arch.embed_dim,
            depth=arch.depth,
            num_heads=arch.num_heads,
            mlp_ratio=arch.mlp_ratio,
            qkv_bias=True,
            num_classes=num_classes,
            global_pool="avg",
            class_token=True,
            fc_norm=True,
            norm_layer=_LayerNorm,
            drop_path_rate=drop_path_rate,
        )
        self.arch = arch
        self.input_size = input_size
        self.transform = InputTransform(arch.img_size, mean, std)
        assert self.pos_embed is not None
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed(arch.embed_dim, arch.img_size // arch.patch_size))

    def forward(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
    ) -> Tensor:
        """[0,1] images at native size -> logits."""
        return super().forward(self.transform(x), attn_mask=attn_mask, is_causal=is_causal)


def patchify(imgs: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), MAE ordering (patch row-major, then pixel, then channel)."""
    b, c, h, w = imgs.shape
    gh, gw = h // p, w // p
    x = imgs.reshape(b, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(x: Tensor, p: int, channels: int = 3) -> Tensor:
    """Inverse of :func:`patchify` for square images."""
    b, length, _ = x.shape
    g = int(round(length**0.5))
    x = x.reshape(b, g, g, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, g * p, g * p)


LOSS_ON = ("all", "masked")  # reconstruction loss over all patches (DMAE) or masked (MAE)


class DenoisingMaskedAutoencoderViT(nn.Module):
    """DMAE pre-training model: noisy + 75%-masked input, clean ``norm_pix`` target, all patches."""

    def __init__(
        self,
        arch: ArchConfig,
        input_size: int,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        sigma: float = 0.25,
        mask_ratio: float = 0.75,
    ):
        super().__init__()
        self.arch = arch
        self.input_size = input_size
        self.sigma = sigma
        self.mask_ratio = mask_ratio
        self.transform = InputTransform(arch.img_size, mean, std)
        d, dd, n = arch.embed_dim, arch.decoder_embed_dim, arch.num_patches
        grid = arch.img_size // arch.patch_size

        self.patch_embed = PatchEmbed(arch.img_size, arch.patch_size, 3, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(sincos_pos_embed(d, grid), requires_grad=False)
        self.blocks = nn.ModuleList(
            [
                Block(d, arch.num_heads, arch.mlp_ratio, qkv_bias=True, norm_layer=_LayerNorm)
                for _ in range(arch.depth)
            ]
        )
        self.norm = _LayerNorm(d)

        self.decoder_embed = nn.Linear(d, dd, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(dd, grid), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(
                    dd,
                    arch.decoder_num_heads,
                    arch.mlp_ratio,
                    qkv_bias=True,
                    norm_layer=_LayerNorm,
                )
                for _ in range(arch.decoder_depth)
            ]
        )
        self.decoder_norm = _LayerNorm(dd)
        self.decoder_pred = nn.Linear(dd, arch.patch_size**2 * 3, bias=True)
        assert self.pos_embed.shape[1] == n + 1
        self._init_weights()

    def _init_weights(self) -> None:
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def random_masking(
        x: Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample random shuffle keeping 1 - mask_ratio: (kept, mask, restore ids)."""
        b, length, d = x.shape
        keep = int(length * (1 - mask_ratio))
        noise = torch.rand(b, length, device=x.device, generator=generator)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d))
        mask = torch.ones(b, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return kept, mask, ids_restore

    def forward_encoder(
        self, x: Tensor, mask_ratio: float, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, generator)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.decoder_embed(x)
        b, length = ids_restore.shape
        masks = self.mask_token.expand(b, length + 1 - x.shape[1], -1)
        tokens = torch.cat([x[:, 1:, :], masks], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred: Tensor = self.decoder_pred(self.decoder_norm(x))
        return pred[:, 1:, :]

    def loss(self, clean: Tensor, pred: Tensor, mask: Tensor | None = None) -> Tensor:
        """MSE against the per-patch normalised clean target (``norm_pix_loss``).

        Averaged over *all* patches (DMAE, Wu et al. 2023, sec. 3.2) when ``mask`` is None, or
        over the masked patches only (MAE, He et al. 2022, sec. 3) given the (B, L) ``mask``
        (1 = masked) that :meth:`forward` returns.
        """
        target = patchify(clean, self.arch.patch_size)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
        if mask is None:
            return ((pred - target) ** 2).mean()
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self,
        imgs: Tensor,
        mask_ratio: float | None = None,
        generator: torch.Generator | None = None,
        loss_on: str = "all",
    ) -> tuple[Tensor, Tensor, Tensor]:
        """imgs in [0,1] at native size. Returns (loss, prediction, mask).

        ``loss_on``: ``"all"`` patches (DMAE) or only the ``"masked"`` ones (MAE).
        """
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        noise = torch.randn(imgs.shape, device=imgs.device, dtype=imgs.dtype, generator=generator)
        noisy = self.transform(imgs + self.sigma * noise)  # no clipping, then resize + normalise
        clean = self.transform(imgs)
        latent, mask, ids_restore = self.forward_encoder(noisy, ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.loss(clean, pred, mask if loss_on == "masked" else None), pred, mask


ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.")


def encoder_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The encoder part of a DMAE state dict (what initialises a classifier)."""
    return {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES)}
