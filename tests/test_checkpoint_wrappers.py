"""Checkpoints researchers actually have (issue 26 item 4): state dicts saved from a DDP or
torch.compile'd model (every key behind ``module.`` / ``_orig_mod.``), and ``args`` holding
pathlib paths or numpy scalars. Wrapper prefixes on every key are removed (and said so in the
source note); any other prefix, or one on some keys only, is refused naming it. Harmless args
types load; anything else is refused naming the global, never advising weights_only=False."""

from __future__ import annotations

import argparse
import builtins
import os
import pathlib
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from service_support import service_settings
from test_checkpoints import (
    inputs,
    official_finetuned,
    official_pretrained,
    reference_logits,
)
from torch import Tensor

from cli import main
from cli.asgi import create_app
from domain.keys import create_key
from models.checkpoints import CheckpointError, load_classifier_with_meta, load_model

WRAPPERS = ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."]


def prefixed(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in state.items()}


def save_finetuned(path: Path, state: dict[str, Tensor], **args: Any) -> Path:
    """A fine-tuned file as the official script writes it (model, epoch, args), with ``state``
    under "model" as given (prefixed or not) and ``args`` in its Namespace."""
    namespace = argparse.Namespace(model="vit_test", epochs=100, **args)
    torch.save({"model": state, "epoch": 99, "args": namespace}, path)
    return path


# ---------------------------------------------------------------- (a) wrapper prefixes


@pytest.mark.parametrize("prefix", WRAPPERS)
def test_a_wrapped_finetuned_file_reproduces_the_unwrapped_logits(
    tmp_path: Path, prefix: str
) -> None:
    """The failing input: a fine-tuned file whose keys all start with ``module.`` was refused
    as "neither a fine-tuned (head.*) nor a pre-trained DMAE file"."""
    state = official_finetuned(6, 16, 4, 128, 2, 256, 5)
    path = save_finetuned(tmp_path / "ddp.pth", prefixed(state, prefix), sigma=0.25)
    model, meta = load_classifier_with_meta(path)
    x = inputs(3, 16)
    with torch.no_grad():
        got = model(x)
    from models.networks import IMAGENET_MEAN, IMAGENET_STD

    torch.testing.assert_close(got, reference_logits(state, x, 2, IMAGENET_MEAN, IMAGENET_STD))
    assert f"key prefix {prefix!r} removed" in meta.source
    # the same weights without the prefix: the same weights hash
    plain = save_finetuned(tmp_path / "plain.pth", state, sigma=0.25)
    assert load_model(plain)[1].weights_sha256 == meta.weights_sha256


@pytest.mark.parametrize("prefix", WRAPPERS[:2])
def test_a_wrapped_bare_pretrained_file_starts_a_finetuning(tmp_path: Path, prefix: str) -> None:
    """``train finetune --pretrained`` on a DDP / compiled pre-training state dict."""
    from models.training.finetune import FinetuneConfig, load_pretrained

    state = official_pretrained(5, 16, 4, 128, 2, 256, 32, 1, 64)
    path = tmp_path / "pre.pth"
    torch.save(prefixed(state, prefix), path)
    cfg = FinetuneConfig(data="digits:test", out=tmp_path / "ft", pretrained=str(path), sigma=0.25)
    pre = load_pretrained(cfg)
    assert pre.meta.kind == "pretrain" and prefix in pre.record["source"]
    assert torch.equal(pre.state["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])


def test_a_wrapper_prefix_on_some_keys_only_is_refused_naming_it(tmp_path: Path) -> None:
    state = official_finetuned(6, 16, 4, 128, 2, 256, 5)
    mixed = {("module." + k if k.startswith("blocks.") else k): v for k, v in state.items()}
    save_finetuned(tmp_path / "mixed.pth", mixed)
    with pytest.raises(CheckpointError, match=r"keys start with 'module\.' and the others"):
        load_model(tmp_path / "mixed.pth")
    # behind a uniform wrapper, the inner mix is named with the whole prefix
    save_finetuned(tmp_path / "mixed2.pth", prefixed(mixed, "_orig_mod."))
    with pytest.raises(CheckpointError, match=r"'_orig_mod\.module\.' and the others"):
        load_model(tmp_path / "mixed2.pth")


@pytest.mark.parametrize("prefix", ["encoder.", "model.", "module.backbone.", "net.module."])
def test_an_unknown_prefix_is_refused_naming_it(tmp_path: Path, prefix: str) -> None:
    state = official_finetuned(6, 16, 4, 128, 2, 256, 5)
    torch.save(prefixed(state, prefix), tmp_path / "bare.pth")
    save_finetuned(tmp_path / "full.pth", prefixed(state, prefix))
    for name in ("bare.pth", "full.pth"):
        with pytest.raises(CheckpointError) as caught:
            load_model(tmp_path / name)
        assert f"carry the prefix {prefix!r}" in str(caught.value)


# ---------------------------------------------------------------- (b) harmless args types


def save_with_global(
    monkeypatch: pytest.MonkeyPatch, path: Path, module: str, name: str, value: str
) -> Path:
    """A fine-tuned file whose args hold an object pickled as the global ``module.name`` (built
    from ``value``), for classes this system cannot create (WindowsPath on Linux) or does not
    have (Python 3.13's ``pathlib._local``)."""
    stand_in = type(name, (), {"__reduce__": lambda self: (type(self), (value,))})
    stand_in.__module__, stand_in.__qualname__ = module, name
    holder = sys.modules.get(module)
    if holder is None:
        holder = types.ModuleType(module)
        monkeypatch.setitem(sys.modules, module, holder)
    monkeypatch.setattr(holder, name, stand_in, raising=False)
    state = official_finetuned(6, 16, 4, 128, 2, 256, 5)
    return save_finetuned(path, state, sigma=0.25, output_dir=stand_in())


HARMLESS: list[tuple[str, Any, Any]] = [
    ("posix_path", pathlib.PosixPath("/runs/ft"), "/runs/ft"),
    ("pure_posix_path", pathlib.PurePosixPath("/runs/ft"), "/runs/ft"),
    ("pure_windows_path", pathlib.PureWindowsPath(r"C:\runs\ft"), r"C:\runs\ft"),
    ("int64", np.int64(7), 7),
    ("int32", np.int32(-3), -3),
    ("float32", np.float32(0.5), 0.5),
    ("float64", np.float64(0.25), 0.25),
    ("bool", np.bool_(True), True),
    ("dtype", np.dtype("float32"), "float32"),
    ("dtype_int", np.dtype(np.int64), "int64"),
]


@pytest.mark.parametrize(("what", "value", "plain"), HARMLESS, ids=[h[0] for h in HARMLESS])
def test_harmless_args_types_load_as_plain_data(
    tmp_path: Path, what: str, value: Any, plain: Any
) -> None:
    """The failing input: args holding a PosixPath (or a numpy scalar) was refused with torch's
    advice to load with weights_only=False."""
    state = official_finetuned(6, 16, 4, 128, 2, 256, 5)
    path = save_finetuned(tmp_path / f"{what}.pth", state, sigma=0.25, extra=value)
    _, meta = load_model(path)
    assert meta.training["extra"] == plain and type(meta.training["extra"]) is type(plain)


def test_a_numpy_sigma_in_args_is_the_models_sigma(tmp_path: Path) -> None:
    state = official_finetuned(6, 16, 4, 128, 2, 256, 5)
    path = save_finetuned(tmp_path / "np.pth", state, sigma=np.float32(0.5))
    _, meta = load_model(path)
    assert meta.sigma == 0.5 and type(meta.sigma) is float


@pytest.mark.parametrize(
    ("module", "name", "value"),
    [
        ("pathlib", "WindowsPath", r"C:\runs\ft"),
        ("pathlib", "PosixPath", "/runs/ft"),
        ("pathlib._local", "PosixPath", "/runs/ft"),  # saved by Python 3.13
        ("pathlib._local", "WindowsPath", r"D:\ft"),
    ],
)
def test_concrete_paths_from_any_system_load_as_pure_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, name: str, value: str
) -> None:
    path = save_with_global(monkeypatch, tmp_path / "p.pth", module, name, value)
    monkeypatch.undo()  # load with the real modules
    _, meta = load_model(path)
    assert meta.training["output_dir"] == value


HOSTILE: list[tuple[Any, str]] = [
    (os.system, "posix.system" if os.name == "posix" else "nt.system"),
    (builtins.eval, "builtins.eval"),
    (builtins.exec, "builtins.exec"),
    (subprocess.Popen, "subprocess.Popen"),
    (os.getcwd, "posix.getcwd" if os.name == "posix" else "nt.getcwd"),
    (pathlib.Path.cwd, "builtins.getattr, pathlib.Path"),  # a bound method
    (np.load, "numpy.load"),
]


@pytest.mark.parametrize(("value", "named"), HOSTILE, ids=[h[1] for h in HOSTILE])
def test_anything_else_is_refused_naming_the_global(tmp_path: Path, value: Any, named: str) -> None:
    state = official_finetuned(6, 16, 4, 128, 2, 256, 5)
    path = save_finetuned(tmp_path / "evil.pth", state, extra=value)
    with pytest.raises(CheckpointError) as caught:
        load_model(path)
    said = str(caught.value)
    assert named in said and "weights_only" not in said and "will likely succeed" not in said


def test_an_object_dtype_is_refused(tmp_path: Path) -> None:
    state = official_finetuned(6, 16, 4, 128, 2, 256, 5)
    path = save_finetuned(tmp_path / "obj.pth", state, extra=np.dtype("O"))
    with pytest.raises(CheckpointError, match="ObjectDType") as caught:
        load_model(path)
    assert "weights_only" not in str(caught.value)


def test_the_refused_reduce_never_runs(tmp_path: Path) -> None:
    """A global that would write a file if called: refused before it is called."""
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    state = official_finetuned(6, 16, 4, 128, 2, 256, 5)
    path = save_finetuned(tmp_path / "evil.pth", state, extra=Evil())
    with pytest.raises(CheckpointError, match="system"):
        load_model(path)
    assert not marker.exists()


# ---------------------------------------------------------------- over HTTP and the CLI


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str]]]:
    app = create_app(service_settings(tmp_path / "data"))
    with TestClient(app) as client:
        with app.state.db.session() as s:
            key = create_key(s, "admin", admin=True)[1]
        yield client, {"X-API-Key": key}


def test_registering_wrapped_files_and_refusals_over_http(
    service: tuple[TestClient, dict[str, str]], tmp_path: Path
) -> None:
    client, h = service
    state = official_finetuned(7, 8, 2, 64, 1, 128, 10)
    ddp = save_finetuned(
        tmp_path / "ddp.pth", prefixed(state, "module."), output_dir=pathlib.PosixPath("/x")
    )
    upload = {"file": ("ddp.pth", ddp.read_bytes())}
    r = client.post("/admin/models", headers=h, files=upload, data={"sigma": "0.25"})
    assert r.status_code == 201, r.text
    assert "key prefix 'module.' removed" in r.json()["source"]
    shown = [m for m in client.get("/admin/models", headers=h).json() if m["name"] == "ddp"]
    assert "'module.' removed" in shown[0]["source"]

    odd = tmp_path / "odd.pth"
    torch.save(prefixed(state, "encoder."), odd)
    r = client.post(
        "/admin/models", headers=h, files={"file": ("odd.pth", odd.read_bytes())},
        data={"sigma": "0.25"},
    )  # fmt: skip
    assert r.status_code == 422 and "'encoder.'" in r.json()["detail"]
    assert str(tmp_path) not in r.text

    evil = save_finetuned(tmp_path / "evil.pth", state, extra=builtins.eval)
    r = client.post(
        "/admin/models", headers=h, files={"file": ("evil.pth", evil.read_bytes())},
        data={"sigma": "0.25"},
    )  # fmt: skip
    assert r.status_code == 422 and "builtins.eval" in r.json()["detail"]
    assert "weights_only" not in r.text and str(tmp_path) not in r.text


def test_the_cli_certifies_with_a_compiled_ddp_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = official_finetuned(2, 8, 2, 64, 1, 128, 10)
    state["head.bias"][3] += 50.0  # a clear favourite: class 3, certified
    path = save_finetuned(
        tmp_path / "c.pth", prefixed(state, "module._orig_mod."), sigma=np.float32(0.25)
    )
    assert main(["certify", "--input", "digits:test", "--max", "1", "--checkpoint", str(path),
                 "--n0", "10", "--n", "50", "--alpha", "0.01", "--no-progress"]) == 0  # fmt: skip
    assert "\t3 radius=" in capsys.readouterr().out


# args may hold any plain data now, so an args.sigma that is a path, a bool, a string or a
# number no sigma can be (the first was a 500: a path stored in the sigma column).
BAD_ARGS_SIGMA: list[tuple[str, Any]] = [
    ("posix_path", pathlib.PosixPath("/runs/s")),
    ("string", "0.25"),
    ("bool", True),
    ("negative", -0.5),
    ("zero", np.float32(0.0)),
    ("nan", float("nan")),
    ("inf", np.float64("inf")),
]


@pytest.mark.parametrize(("what", "value"), BAD_ARGS_SIGMA, ids=[b[0] for b in BAD_ARGS_SIGMA])
def test_an_unusable_args_sigma_is_refused_unless_sigma_is_given(
    service: tuple[TestClient, dict[str, str]], tmp_path: Path, what: str, value: Any
) -> None:
    client, h = service
    state = official_finetuned(7, 8, 2, 64, 1, 128, 10)
    path = save_finetuned(tmp_path / f"{what}.pth", prefixed(state, "module."), sigma=value)
    upload = {"file": (f"{what}.pth", path.read_bytes())}
    r = client.post("/admin/models", headers=h, files=upload)
    assert r.status_code == 422, r.text
    said = r.json()["detail"]
    assert "not a positive finite number" in said and "sigma field" in said, said
    assert str(tmp_path) not in r.text
    assert not [m for m in client.get("/admin/models", headers=h).json() if m["name"] == what]
    assert not list((tmp_path / "data").rglob("*.ckpt")), "a refused upload is not kept"
    r = client.post("/admin/models", headers=h, files=upload, data={"sigma": "0.25"})
    assert r.status_code == 201 and r.json()["sigma"] == 0.25, r.text
