"""Checkpoints: the project format (safetensors + metadata) and the official DMAE importer.

Checkpoints are data, never code. Project files are safetensors; official ``.pth`` files are
read with ``torch.load(weights_only=True)`` allowing only ``argparse.Namespace`` (the ``args``
of the official fine-tuning script) and the plain data training scripts put in it (pathlib
paths, numpy numeric scalars and dtypes). Anything else pickled is refused, naming the global
it needs, before it can run. Keys saved from a DDP or torch.compile'd model lose the wrapper
prefix (``module.``, ``_orig_mod.``) that every one carries.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.networks import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ArchConfig,
    DenoisingMaskedAutoencoderViT,
    DMAEClassifier,
)

FORMAT = "dmae-certify/1"
META_KEY = "dmae_certify"
BUNDLED_DIR = Path(__file__).parent / "bundled"
OFFICIAL_LICENCE = (
    "Official DMAE code and weights (github.com/quanlin-wu/dmae) are licensed CC BY-NC 4.0: "
    "non-commercial use only."
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with the reason."""


@dataclass
class CheckpointMeta:
    """Everything needed to rebuild a model and to state what its certificates mean."""

    kind: str  # "classifier" or "pretrain"
    arch: ArchConfig
    input_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    num_classes: int = 0
    classes: list[str] = field(default_factory=list)
    sigma: float | None = None
    name: str | None = None
    source: str = "dmae-certify"
    licence: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    weights_sha256: str = ""
    classes_source: str = ""  # set when the class names were not stored with the weights

    def to_json(self) -> str:
        data = asdict(self)
        data["arch"] = self.arch.to_dict()
        data["format"] = FORMAT
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        data = json.loads(text)
        if data.pop("format", None) != FORMAT:
            raise CheckpointError(f"not a {FORMAT} checkpoint")
        data["arch"] = ArchConfig.from_dict(data["arch"])
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def class_name(self, index: int | None) -> str | None:
        if index is None:
            return None
        return self.classes[index] if index < len(self.classes) else str(index)


def tensors_sha256(state: dict[str, Tensor]) -> str:
    """Hash of the weights themselves (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: str | Path, model: nn.Module, meta: CheckpointMeta) -> CheckpointMeta:
    """Write ``model``'s weights and ``meta`` as one safetensors file; returns the stored meta."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta.weights_sha256 = tensors_sha256(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={META_KEY: meta.to_json()})
    return meta


def read_meta(path: str | Path) -> CheckpointMeta:
    """Metadata of a project checkpoint without loading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if raw is None:
        raise CheckpointError(f"{path}: safetensors file has no {META_KEY!r} metadata")
    try:
        return CheckpointMeta.from_json(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid metadata ({exc})") from exc


def build_model(meta: CheckpointMeta) -> nn.Module:
    if meta.kind == "classifier":
        return DMAEClassifier(meta.arch, meta.num_classes, meta.input_size, meta.mean, meta.std)
    if meta.kind == "pretrain":
        return DenoisingMaskedAutoencoderViT(
            meta.arch, meta.input_size, meta.mean, meta.std, sigma=meta.sigma or 0.25
        )
    raise CheckpointError(f"unknown checkpoint kind {meta.kind!r}")


def _load_strict(model: nn.Module, state: dict[str, Tensor], origin: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{origin}: weights do not match the architecture: {exc}") from exc


def load_project(path: str | Path) -> tuple[nn.Module, CheckpointMeta]:
    meta = read_meta(path)
    state = load_file(str(path))
    if meta.weights_sha256 and tensors_sha256(state) != meta.weights_sha256:
        raise CheckpointError(f"{path}: weights do not match their recorded sha256 (corrupt?)")
    model = build_model(meta)
    _load_strict(model, state, str(path))
    return model.eval(), meta


# ---------------------------------------------------------------- official DMAE files


OFFICIAL_MARKER_KEY = "patch_embed.proj.weight"

# torch's generic lines around the specific reason (some advise weights_only=False: never shown).
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """``numpy.core.multiarray.scalar`` (how numpy pickles a scalar such as ``np.int64(3)``),
    only for a numeric or bool dtype and its raw bytes: never an object item."""
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("a numpy scalar that is not a plain number")
    import importlib

    # numpy 2 moved numpy.core to numpy._core (the old name is a deprecated alias)
    core = importlib.import_module("numpy._core" if hasattr(np, "_core") else "numpy.core")
    return core.multiarray.scalar(dtype, data)


def _safe_globals() -> list[Any]:
    """What an official file's pickle may name besides tensors: the ``args`` Namespace and the
    plain data training scripts put in it (pathlib paths, numpy numeric scalars and dtypes).
    Nothing here runs code or touches the file system: every concrete path class (which may
    not be instantiable on this system, e.g. a WindowsPath on Linux) loads as its pure form."""
    import numpy as np

    paths: list[Any] = []
    for module in ("pathlib", "pathlib._local"):  # Python 3.13 moved the classes
        for cls in (PurePosixPath, PureWindowsPath):
            pure = cls.__name__
            paths += [(cls, f"{module}.{pure}"), (cls, f"{module}.{pure[4:]}")]
    dtypes = [type(np.dtype(code)) for code in "?bhilqBHILQefdgFDG"]
    scalars = [(_numpy_scalar, f"{m}.multiarray.scalar") for m in ("numpy.core", "numpy._core")]
    return [argparse.Namespace, np.dtype, *dtypes, *scalars, *paths]


def _python3_name(name: str) -> str:
    """A pickled global's Python 3 name: torch.save writes protocol 2, where pickle names some
    modules as Python 2 did (``subprocess.Popen`` is stored as ``commands.Popen``)."""
    import _compat_pickle

    module, _, attr = name.rpartition(".")
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        return ".".join(_compat_pickle.NAME_MAPPING[(module, attr)])
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attr}" if module else name


def _blocked_globals(path: str | Path, error: str) -> list[str]:
    """The globals ``path``'s pickle needs that are not allowed, by their Python 3 names: the
    one the unpickler stopped at, then any others torch's scan of the pickle finds."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            scanned = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # a corrupt file: only the error's own words
        scanned = []
    names = [_python3_name(n) for n in re.findall(r"GLOBAL ([\w.]+)", error)[:1] + scanned]
    qualified = [n for n in names if "." in n]
    # the unpickler names a builtin without its module ("eval"): the scan's "builtins.eval"
    return list(
        dict.fromkeys(
            n if "." in n else next((q for q in qualified if q.endswith("." + n)), n) for n in names
        )
    )


def _load_failure_reason(path: str | Path, exc: Exception) -> str:
    """Why torch.load refused ``path``: the globals its pickle needs that are not allowed, else
    the specific line of the error (never torch's advice to load with weights_only=False)."""
    text = str(exc)
    blocked = _blocked_globals(path, text)
    if blocked:
        return (
            f"its pickle needs {', '.join(blocked)}, which "
            + ("is" if len(blocked) == 1 else "are")
            + " not plain data (allowed: "
            "tensors, argparse.Namespace, pathlib paths, numpy numeric scalars and dtypes)"
        )
    built = re.search(r"but got <class '([^']+)'>", text)
    if built:
        return f"its pickle builds a {built.group(1)}, which is not plain data"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    specific = [
        line
        for line in lines
        if not line.startswith(_TORCH_BOILERPLATE) and "weights_only" not in line
    ]
    return f"{type(exc).__name__}: {specific[0][:300]}" if specific else type(exc).__name__


def _torch_load_safely(path: str | Path) -> Any:
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, zip errors, EOF: all mean "not loadable data"
        raise CheckpointError(
            f"{path}: refused: not a plain tensor checkpoint (it would need to unpickle "
            f"arbitrary objects, or it is corrupt): {_load_failure_reason(path, exc)}"
        ) from exc


def _count_blocks(state: dict[str, Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    ids = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    if ids != set(range(len(ids))):
        raise CheckpointError(f"{prefix} indices are not contiguous: {sorted(ids)}")
    return len(ids)


# The official DMAE/MAE ViTs (models_vit.py, models_dmae.py): size -> (width, heads).
KNOWN_VITS = {
    "tiny": (192, 3),
    "small": (384, 6),
    "base": (768, 12),
    "large": (1024, 16),
    "huge": (1280, 16),
}
_VIT_NAME = re.compile(r"vit_(tiny|small|base|large|huge)(?:_patch(\d+))?")
HEADS_HINT = "give the number of attention heads: num_heads (dmae-certify: --num-heads)"
OFFICIAL_DECODER_HEADS = 16


def infer_heads(dim: int, patch: int, num_heads: int | None, model_name: str | None) -> int:
    """Attention heads, which no tensor shape holds. Never a guess that could be wrong:

    - ``num_heads`` when given (it must divide the width);
    - else the heads of the architecture ``model_name`` names (``args.model`` of official
      files, e.g. ``vit_base_patch16``: 12), if its width (and patch) match the weights;
    - else width / 64, the head width of every standard ViT, for widths that are multiples of
      64, except 1280 (ViT-H uses 16 heads of 80);
    - anything else (a name that disagrees, another width) is a CheckpointError naming
      ``num_heads`` / ``--num-heads``.
    """
    if num_heads is not None:
        if num_heads < 1 or dim % num_heads:
            raise CheckpointError(f"num_heads={num_heads} does not divide the width {dim}")
        return num_heads
    named = _VIT_NAME.search(model_name or "")
    if named is not None:
        size, named_patch = named.group(1), named.group(2)
        width, heads = KNOWN_VITS[size]
        if width == dim and (named_patch is None or int(named_patch) == patch):
            return heads
        raise CheckpointError(
            f"the file's model name {model_name!r} is a ViT-{size} (width {width}"
            + (f", patch {named_patch}" if named_patch else "")
            + f") but its weights have width {dim}, patch {patch}: {HEADS_HINT}"
        )
    if dim % 64 == 0 and dim != KNOWN_VITS["huge"][0]:
        return dim // 64
    raise CheckpointError(
        f"cannot tell the number of attention heads of a width-{dim} encoder"
        + (" (ViT-H uses 16, width / 64 would give 20)" if dim == KNOWN_VITS["huge"][0] else "")
        + f" and the file names no known architecture: {HEADS_HINT}"
    )


def infer_arch(
    state: dict[str, Tensor], num_heads: int | None = None, model_name: str | None = None
) -> ArchConfig:
    """Architecture from tensor shapes; heads by :func:`infer_heads` (they are in no shape)."""
    try:
        proj = state["patch_embed.proj.weight"]
        pos = state["pos_embed"]
        dim, _, patch, _ = proj.shape
        grid = math.isqrt(pos.shape[1] - 1)
        if grid * grid != pos.shape[1] - 1:
            raise CheckpointError("pos_embed does not describe a square patch grid")
        depth = _count_blocks(state, "blocks")
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        fields: dict[str, Any] = dict(
            img_size=grid * patch,
            patch_size=patch,
            embed_dim=dim,
            depth=depth,
            num_heads=infer_heads(dim, patch, num_heads, model_name),
            mlp_ratio=hidden / dim,
        )
        if "decoder_embed.weight" in state:
            ddim = state["decoder_embed.weight"].shape[0]
            if ddim % OFFICIAL_DECODER_HEADS:
                raise CheckpointError(
                    f"decoder width {ddim} is not a multiple of the official "
                    f"{OFFICIAL_DECODER_HEADS} decoder heads: not an official DMAE decoder"
                )
            fields.update(
                decoder_embed_dim=ddim,
                decoder_depth=_count_blocks(state, "decoder_blocks"),
                decoder_num_heads=OFFICIAL_DECODER_HEADS,
            )
    except KeyError as exc:
        raise CheckpointError(f"not a DMAE/ViT state dict: missing {exc}") from exc
    return ArchConfig(**fields)


# Prefixes that training wrappers put before every key of a model's state dict:
# DistributedDataParallel / DataParallel ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_WRAPPERS = "DDP's 'module.', torch.compile's '_orig_mod.'"


def strip_wrapper_prefixes(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """``state`` without the wrapper prefixes that *every* key carries (in any nesting, e.g.
    ``module._orig_mod.``), and the prefix removed ("" if none).

    A wrapper prefix on some keys only, or any other prefix before the official keys (e.g.
    ``encoder.patch_embed.proj.weight``), is a CheckpointError naming the prefix: such a file
    is not one model's weights as the official code names them, and guessing could mix models.
    """
    removed = ""
    while state:
        for prefix in WRAPPER_PREFIXES:
            count = sum(k.startswith(prefix) for k in state)
            if count == len(state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                removed += prefix
                break
            if count:
                raise CheckpointError(
                    f"{count} of {len(state)} keys start with {removed + prefix!r} and the "
                    "others do not: a wrapper prefix must be on every key of the state dict"
                )
        else:
            break
    if OFFICIAL_MARKER_KEY not in state:
        marked = sorted(k for k in state if k.endswith("." + OFFICIAL_MARKER_KEY))
        if marked:
            prefix = removed + marked[0][: -len(OFFICIAL_MARKER_KEY)]
            raise CheckpointError(
                f"the weights' keys carry the prefix {prefix!r} (e.g. {removed + marked[0]!r}), "
                f"which is not a training wrapper's prefix ({_WRAPPERS}): not importable as is"
            )
    return state, removed


def _plain(value: Any) -> Any:
    """An ``args`` value as plain data: numpy scalars as Python numbers, paths and dtypes as
    strings (how the metadata records them); anything else unchanged."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, PurePath | np.dtype):
        return str(value)
    return value


@dataclass
class OfficialFile:
    """An official DMAE file, read safely: its state dict, form and (fine-tuned) args."""

    state: dict[str, Tensor]
    form: str  # "pretrained" (encoder + decoder) or "finetuned" (encoder + fc_norm + head)
    args: dict[str, Any]
    prefix_removed: str = ""  # the wrapper prefix every key carried (e.g. "module."), if any


def _is_bare_state(obj: Any) -> bool:
    """A bare state dict: the official marker key (maybe behind a prefix) holds a tensor."""
    return isinstance(obj, dict) and any(
        isinstance(k, str)
        and (k == OFFICIAL_MARKER_KEY or k.endswith("." + OFFICIAL_MARKER_KEY))
        and isinstance(v, Tensor)
        for k, v in obj.items()
    )


def read_official(path: str | Path) -> OfficialFile:
    """An official file: ``{'model': state, 'args': ...}`` or a bare state dict of tensors with
    the official key layout (how the released pre-trained weights are stored); keys saved from
    a DDP or torch.compile'd model lose the prefix every one carries
    (:func:`strip_wrapper_prefixes`)."""
    obj = _torch_load_safely(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        raw = obj["model"]
    elif _is_bare_state(obj):
        raw = obj  # a bare state dict
    else:
        raise CheckpointError(
            f"{path}: expected an official DMAE file: {{'model': state dict, ...}} or a bare "
            f"state dict with the official keys ({OFFICIAL_MARKER_KEY}, pos_embed, blocks.N.*)"
        )
    tensors = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, Tensor)}
    try:
        state, removed = strip_wrapper_prefixes(tensors)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    namespace = obj.get("args")
    args = (
        {k: _plain(v) for k, v in vars(namespace).items()}
        if isinstance(namespace, argparse.Namespace)
        else {}
    )
    if "head.weight" in state:
        form = "finetuned"
    elif "decoder_embed.weight" in state:
        form = "pretrained"
    else:
        raise CheckpointError(f"{path}: neither a fine-tuned (head.*) nor a pre-trained DMAE file")
    return OfficialFile(state, form, args, removed)


def import_official(
    path: str | Path,
    *,
    input_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    classes: list[str] | None = None,
    sigma: float | None = None,
    num_heads: int | None = None,
) -> tuple[nn.Module, CheckpointMeta]:
    """Load an official DMAE file as a classifier (fine-tuned) or pre-training model.

    Mean/std are not stored in official files: ImageNet's unless given (pass CIFAR's for CIFAR
    models, with ``input_size=32``). Nor are class names: without ``classes`` they default by
    :func:`models.classnames.default_classes` (ImageNet-1k or CIFAR-10 names, else indices).
    """
    from models.classnames import default_classes

    off = read_official(path)
    model_name = off.args.get("model")
    arch = infer_arch(
        off.state,
        num_heads or off.args.get("num_heads"),
        model_name if isinstance(model_name, str) else None,
    )
    meta = CheckpointMeta(
        kind="classifier" if off.form == "finetuned" else "pretrain",
        arch=arch,
        input_size=input_size or arch.img_size,
        mean=tuple(mean or IMAGENET_MEAN),
        std=tuple(std or IMAGENET_STD),
        sigma=sigma if sigma is not None else off.args.get("sigma"),
        name=Path(path).stem,
        source=f"official DMAE {off.form} file {Path(path).name}"
        + (f" (key prefix {off.prefix_removed!r} removed)" if off.prefix_removed else ""),
        licence=OFFICIAL_LICENCE,
        training={k: v for k, v in off.args.items() if isinstance(v, int | float | str | bool)},
    )
    if off.form == "finetuned":
        meta.num_classes = int(off.state["head.weight"].shape[0])
        if classes:
            meta.classes = list(classes)
        else:
            meta.classes, meta.classes_source = default_classes(
                meta.num_classes, meta.mean, meta.std
            )
        if len(meta.classes) != meta.num_classes:
            raise CheckpointError(
                f"{len(meta.classes)} class names given for a {meta.num_classes}-class head"
            )
    model = build_model(meta)
    _load_strict(model, off.state, str(path))
    meta.weights_sha256 = tensors_sha256(model.state_dict())
    return model.eval(), meta


# ---------------------------------------------------------------- public entry points


def bundled_models() -> dict[str, Path]:
    """Names of the checkpoints shipped with the package (e.g. ``digits-s0.25``)."""
    return {p.stem: p for p in sorted(BUNDLED_DIR.glob("*.safetensors"))}


def resolve(path_or_name: str | Path) -> Path:
    """A path, or the name of a bundled model, to an existing checkpoint file."""
    bundled = bundled_models()
    if str(path_or_name) in bundled:
        return bundled[str(path_or_name)]
    path = Path(path_or_name)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint file {str(path_or_name)!r} and no bundled model of that name "
            f"(bundled: {', '.join(bundled) or 'none'})"
        )
    return path


def _is_safetensors(path: Path) -> bool:
    """safetensors: 8-byte header length, then a JSON header; torch.save files are zip/pickle."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def load_model(path_or_name: str | Path, **official: Any) -> tuple[nn.Module, CheckpointMeta]:
    """Any supported checkpoint -> (model in eval mode, metadata)."""
    path = resolve(path_or_name)
    if _is_safetensors(path):
        return load_project(path)
    return import_official(path, **official)


def load_classifier_with_meta(
    path_or_name: str | Path, **official: Any
) -> tuple[nn.Module, CheckpointMeta]:
    model, meta = load_model(path_or_name, **official)
    if meta.kind != "classifier":
        raise CheckpointError(
            f"{path_or_name}: a pre-training checkpoint has no classification head; "
            "fine-tune it first (dmae-certify train finetune)"
        )
    return model, meta


def load_classifier(path: str | Path, **official: Any) -> nn.Module:
    """A classifier in eval mode mapping (B, 3, H, W) in [0,1] to logits, from either format."""
    return load_classifier_with_meta(path, **official)[0]
