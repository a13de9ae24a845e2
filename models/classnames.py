"""Class names: defaults for official models that store none, and folder-name lookup.

Official DMAE files carry no class names. A 1000-class head with ImageNet mean/std is the
ImageNet-1k classifier: its names come from timm (``timm.data.ImageNetInfo``, index order of the
standard sorted WordNet ids). A 10-class head with CIFAR mean/std is a CIFAR-10 classifier (the
dataset's own index order). Anything else gets its indices as names. ``source`` says which.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
IMAGENET_SOURCE = (
    "ImageNet-1k class names (timm ImageNetInfo), assumed: the file stores none, and it has "
    "1000 classes and ImageNet mean/std"
)
CIFAR10_SOURCE = (
    "CIFAR-10 class names, assumed: the file stores none, and it has 10 classes and CIFAR mean/std"
)
INDEX_SOURCE = "class indices: the file stores no class names"


@lru_cache(maxsize=1)
def imagenet_info() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(descriptions, WordNet ids) of the 1000 ImageNet-1k classes, in index order."""
    from timm.data.imagenet_info import ImageNetInfo

    info = ImageNetInfo()
    num_classes: Callable[[], int] = info.num_classes  # timm's method is unannotated
    count = num_classes()
    return (
        tuple(info.index_to_description(i) for i in range(count)),
        tuple(info.index_to_label_name(i) for i in range(count)),
    )


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-4 for x, y in zip(a, b, strict=True))


def default_classes(
    num_classes: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[list[str], str]:
    """(names, source) for a model whose file stores no class names."""
    from models.networks import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD

    if num_classes == 1000 and _close(mean, IMAGENET_MEAN) and _close(std, IMAGENET_STD):
        return list(imagenet_info()[0]), IMAGENET_SOURCE
    if num_classes == 10 and _close(mean, CIFAR_MEAN) and _close(std, CIFAR_STD):
        return list(CIFAR10_CLASSES), CIFAR10_SOURCE
    return [str(i) for i in range(num_classes)], INDEX_SOURCE


@dataclass
class ClassLookup:
    """Class name (or, for ImageNet names, WordNet id) -> index of a model's classes."""

    classes: list[str]

    def index(self, name: str) -> int | None:
        """The model's index of class ``name``, None if it has no such class; ValueError if
        several classes bear that name."""
        hits = [i for i, c in enumerate(self.classes) if c == name]
        if not hits and len(self.classes) == 1000 and tuple(self.classes) == imagenet_info()[0]:
            hits = [i for i, wnid in enumerate(imagenet_info()[1]) if wnid == name]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise ValueError(
                f"{name!r} names {len(hits)} classes of the model (indices "
                f"{', '.join(map(str, hits))}); name the folder by an unambiguous class"
                + (" (ImageNet: its WordNet id)" if len(self.classes) == 1000 else "")
            )
        return None

    def describe(self, limit: int = 30) -> str:
        shown = ", ".join(self.classes[:limit])
        more = len(self.classes) - limit
        return f"its classes are: {shown}" + (f", ... ({more} more)" if more > 0 else "")
