"""Training inputs: the built-in digits split or an ImageFolder directory, in a fixed order.

Batches are lists of keys ``(index, seed)``. The order of an epoch is a function of the run's
seed and the epoch number only, and random augmentation of a sample is seeded by its key, so a
run resumed in the middle of an epoch sees exactly the batches (and augmentations) that the
uninterrupted run would have seen, whatever the number of data-loading workers.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from models.data import ImageFolderDataset, built_in, load_image, open_inputs
from models.images import displayed_rgb, open_file
from models.networks import IMAGENET_MEAN, IMAGENET_STD

Key = tuple[int, int]
Batch = tuple[Tensor, Tensor]
# A random training transform: an 8-bit RGB image -> (3, S, S) float tensor in [0, 1].
ImageTransform = Callable[[Image.Image], Tensor]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch, NumPy and Python RNGs seeded by ``seed``, then restore them."""
    saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's is the run's
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


def epoch_order(seed: int, epoch: int, size: int) -> list[Key]:
    """The (index, augmentation seed) sequence of one epoch: a function of (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(size, generator=g)
    seeds = torch.randint(0, 2**62, (size,), generator=g)
    return list(zip(perm.tolist(), seeds.tolist(), strict=True))


class FolderImages(Dataset[tuple[Tensor, int]]):
    """ImageFolder images by key: the documented conversion, or a transform seeded per key."""

    def __init__(
        self,
        items: Sequence[tuple[Path, int, str]],
        input_size: int,
        transform: ImageTransform | None,
    ):
        self.items = list(items)
        self.input_size = input_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: Key) -> tuple[Tensor, int]:
        index, seed = key
        path, label, _ = self.items[index]
        if self.transform is None:
            return load_image(path, self.input_size), label
        rgb = open_file(path, displayed_rgb)  # orientation, transparency, bit depth as certified
        with seeded(seed):
            return self.transform(rgb), label

    def with_transform(self, transform: ImageTransform | None) -> FolderImages:
        return FolderImages(self.items, self.input_size, transform)

    def fingerprint(self) -> str:
        """Hash of the listing (relative name, label, byte size): cheap even for ImageNet."""
        h = hashlib.sha256()
        for path, label, name in self.items:
            h.update(f"{name}|{label}|{path.stat().st_size}\n".encode())
        return "listing-sha256:" + h.hexdigest()


@dataclass
class TrainData:
    """A labelled training or evaluation set, either in memory (digits) or as files."""

    spec: str
    input_size: int
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str
    tensors: tuple[Tensor, Tensor] | None = None
    files: FolderImages | None = None
    num_workers: int = 0

    def __len__(self) -> int:
        if self.tensors is not None:
            return int(self.tensors[1].shape[0])
        assert self.files is not None
        return len(self.files)

    def describe(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "images": len(self),
            "classes": len(self.classes),
            "input_size": self.input_size,
            "fingerprint": self.fingerprint,
        }

    def batches(self, keys: Sequence[Sequence[Key]]) -> Iterator[Batch]:
        """Yield (images, labels) for each list of keys, in order."""
        if self.tensors is not None:
            x, y = self.tensors
            for batch in keys:
                idx = torch.tensor([k[0] for k in batch], dtype=torch.long)
                yield x[idx], y[idx]
            return
        assert self.files is not None
        loader = DataLoader(
            self.files,
            batch_sampler=[list(b) for b in keys],
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(0),  # keeps the global RNG untouched
        )
        for x, y in loader:
            yield x, y.long()

    def in_order(self, batch_size: int, limit: int | None = None) -> Iterator[Batch]:
        """Un-augmented evaluation batches in index order (the first ``limit`` images)."""
        size = len(self) if limit is None else min(limit, len(self))
        keys = [(i, 0) for i in range(size)]
        chunks = [keys[i : i + batch_size] for i in range(0, size, batch_size)]
        if self.files is not None and self.files.transform is not None:
            yield from replace(self, files=self.files.with_transform(None)).batches(chunks)
        else:
            yield from self.batches(chunks)

    def subset(self, indices: Sequence[int], spec: str) -> TrainData:
        """The same data restricted to ``indices`` (a held-out split)."""
        idx = list(indices)
        if self.tensors is not None:
            x, y = self.tensors
            sel = torch.tensor(idx, dtype=torch.long)
            return TrainData(
                spec, self.input_size, self.classes, self.mean, self.std,
                _fingerprint_tensors(x[sel], y[sel]), tensors=(x[sel], y[sel]),
            )  # fmt: skip
        assert self.files is not None
        files = FolderImages(
            [self.files.items[i] for i in idx], self.input_size, self.files.transform
        )
        return replace(self, spec=spec, fingerprint=files.fingerprint(), files=files)


def _fingerprint_tensors(x: Tensor, y: Tensor) -> str:
    h = hashlib.sha256()
    h.update(x.contiguous().numpy().tobytes())
    h.update(y.contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


def train_transform(
    input_size: int,
    scale: tuple[float, float],
    mean: tuple[float, ...],
    randaug: str | None = None,
) -> ImageTransform:
    """RandomResizedCrop (bicubic) + horizontal flip (+ timm RandAugment) -> [0,1] tensor."""
    from torchvision import transforms

    steps: list[Any] = [
        transforms.RandomResizedCrop(
            input_size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC
        ),
        transforms.RandomHorizontalFlip(),
    ]
    if randaug:
        from timm.data.auto_augment import rand_augment_transform

        hparams = {
            "translate_const": int(input_size * 0.45),
            "img_mean": tuple(round(255 * m) for m in mean),
        }
        try:
            steps.append(rand_augment_transform(randaug, hparams))
        except (AssertionError, KeyError, ValueError) as exc:
            raise ValueError(f"invalid RandAugment spec {randaug!r} ({exc})") from exc
    steps.append(transforms.ToTensor())
    composed: ImageTransform = transforms.Compose(steps)
    return composed


def open_training_data(
    spec: str,
    input_size: int | None,
    *,
    augment: Callable[[int, tuple[float, ...]], ImageTransform] | None = None,
    num_workers: int = 0,
) -> TrainData:
    """A built-in dataset (``digits:train|test``, ``mnist:train|test``) or an ImageFolder
    root, with labels and classes.

    ``augment(input_size, mean)`` builds the random transform for ImageFolder images; the
    built-in digit sets are never augmented (crops and flips do not preserve a digit's class).
    """
    source = built_in(spec)
    if source is not None:
        size = input_size or source.native_size
        inputs = open_inputs(spec, size)
        x = torch.stack([inputs[i][0] for i in range(len(inputs))])
        y = torch.tensor([inputs[i][1] for i in range(len(inputs))], dtype=torch.long)
        return TrainData(
            spec, size, list(inputs.classes or []), source.mean, source.std,
            _fingerprint_tensors(x, y), tensors=(x, y),
        )  # fmt: skip
    root = Path(spec)
    if not root.is_dir():
        raise FileNotFoundError(
            f"training data {spec!r} is neither a built-in dataset (digits:train|test, "
            "mnist:train|test) nor an ImageFolder directory"
        )
    if input_size is None:
        raise ValueError(f"{spec}: give --input-size for an ImageFolder dataset")
    inputs = open_inputs(spec, input_size)
    if not isinstance(inputs, ImageFolderDataset):
        raise ValueError(f"{spec}: training needs an ImageFolder root (one sub-folder per class)")
    items = [(Path(src), label, name) for src, label, name in inputs.items]  # type: ignore[arg-type]
    transform = augment(input_size, IMAGENET_MEAN) if augment is not None else None
    files = FolderImages(items, input_size, transform)
    return TrainData(
        spec, input_size, list(inputs.classes or []), IMAGENET_MEAN, IMAGENET_STD,
        files.fingerprint(), files=files, num_workers=num_workers,
    )  # fmt: skip


def split_off(data: TrainData, fraction: float, seed: int) -> tuple[TrainData, TrainData]:
    """A seeded random (train, held-out) split of ``data``; ``fraction`` goes to held-out."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must lie in (0, 1), got {fraction}")
    n = len(data)
    held = max(1, round(n * fraction))
    if held >= n:
        raise ValueError(f"{data.spec}: {n} images are too few to hold out {fraction:.0%}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    train = data.subset(sorted(perm[held:]), f"{data.spec} (train part)")
    val = data.subset(sorted(perm[:held]), f"{data.spec} (held-out {fraction:g})")
    return train, val
