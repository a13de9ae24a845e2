"""Inputs: the one documented image conversion, the digits dataset, ImageFolder and input specs.

The tensor a certificate's radius refers to is what :func:`preprocess` returns: RGB, the shorter
side bicubic-resized to the model's input size S, centre-cropped to S x S, float32 in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def preprocess(img: Image.Image, input_size: int) -> Tensor:
    """PIL image -> (3, S, S) float32 in [0, 1]: RGB, shorter side resized to S, centre crop."""
    img = img.convert("RGB")
    w, h = img.size
    scale = input_size / min(w, h)
    nw, nh = max(input_size, round(w * scale)), max(input_size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - input_size) // 2, (nh - input_size) // 2
    img = img.crop((left, top, left + input_size, top + input_size))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def tensor_bytes(x: Tensor) -> bytes:
    """The raw float32 bytes (C order) of ``x``: how a preprocessed input is stored."""
    return x.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()


def tensor_from_bytes(data: bytes, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`tensor_bytes`: a float32 tensor of ``shape``."""
    arr = np.frombuffer(data, dtype=np.float32).reshape(tuple(shape))
    return torch.from_numpy(arr.copy())


def load_image(path: str | Path, input_size: int) -> Tensor:
    with Image.open(path) as img:
        return preprocess(img, input_size)


# ---------------------------------------------------------------- digits (scikit-learn)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        data.target,
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=data.target,
    )
    return x_train, x_test, y_train, y_test


DIGITS_CLASSES = [str(i) for i in range(10)]


def load_digits_split(split: str) -> tuple[Tensor, Tensor, list[str]]:
    """scikit-learn's digits as (N, 3, 8, 8) float32 in [0, 1] (grey to RGB), labels, classes.

    A fixed, seeded, stratified 80/20 split: 1,437 train and 360 test images.
    """
    x_train, x_test, y_train, y_test = _digits()
    if split == "train":
        x, y = x_train, y_train
    elif split == "test":
        x, y = x_test, y_test
    else:
        raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
    images = torch.from_numpy(x).unsqueeze(1).repeat(1, 3, 1, 1)
    return images, torch.from_numpy(y).long(), list(DIGITS_CLASSES)


def digits_stats() -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Mean and std of the digits train split (the constants below; a test checks them)."""
    x_train = _digits()[0]
    m, s = float(x_train.mean()), float(x_train.std())
    return (m, m, m), (s, s, s)


# Constants so that importing this module does not load scikit-learn.
DIGITS_MEAN = (0.30538338, 0.30538338, 0.30538338)
DIGITS_STD = (0.37611917, 0.37611917, 0.37611917)


# ---------------------------------------------------------------- input sets


class InputSet(Dataset[tuple[Tensor, int, str]]):
    """A sequence of (image tensor, label or -1, name) with optional class names."""

    def __init__(
        self,
        items: Sequence[tuple[Path | Tensor, int, str]],
        input_size: int,
        classes: list[str] | None,
    ):
        self.items = list(items)
        self.input_size = input_size
        self.classes = classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, int, str]:
        src, label, name = self.items[i]
        x = src if isinstance(src, Tensor) else load_image(src, self.input_size)
        return x, label, name


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class ImageFolderDataset(InputSet):
    """ImageFolder layout: one sub-folder per class (sorted names give label indices)."""

    def __init__(self, root: str | Path, input_size: int):
        root = Path(root)
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and _images_in(d))
        if not classes:
            raise ValueError(f"{root}: no class sub-folders with images")
        items: list[tuple[Path | Tensor, int, str]] = [
            (p, label, f"{name}/{p.name}")
            for label, name in enumerate(classes)
            for p in _images_in(root / name)
        ]
        super().__init__(items, input_size, classes)


def _resize_tensors(x: Tensor, input_size: int) -> Tensor:
    if x.shape[-1] == input_size:
        return x
    return torch.nn.functional.interpolate(
        x, size=(input_size, input_size), mode="bicubic", align_corners=False
    ).clamp(0, 1)


def open_inputs(spec: str, input_size: int) -> InputSet:
    """An image file, a folder of images, an ImageFolder root, or ``digits:train|test``."""
    if spec.startswith("digits:"):
        x, y, classes = load_digits_split(spec.split(":", 1)[1])
        x = _resize_tensors(x, input_size)
        items: list[tuple[Path | Tensor, int, str]] = [
            (x[i], int(y[i]), f"digits:{i}") for i in range(len(y))
        ]
        return InputSet(items, input_size, classes)
    path = Path(spec)
    if path.is_file():
        return InputSet([(path, -1, path.name)], input_size, None)
    if path.is_dir():
        if any(d.is_dir() and _images_in(d) for d in path.iterdir()):
            return ImageFolderDataset(path, input_size)
        files = _images_in(path)
        if not files:
            raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        return InputSet([(p, -1, p.name) for p in files], input_size, None)
    raise FileNotFoundError(f"input {spec!r} is not a file, a folder or 'digits:train|test'")
