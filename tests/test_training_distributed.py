"""Multi-process training under torchrun: sharding, the process world, and a real 2-process
CPU (gloo) run that resumes a one-process run and matches it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DistributedSampler

from models.checkpoints import load_model, read_meta
from models.training.distributed import (
    World,
    process_device,
    rank_seed,
    shard_micro_batches,
    world_from_env,
)
from models.training.pretrain import PretrainConfig, run_pretrain
from models.training.state import STATE_FILE, load_state

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_shards_deal_out_each_global_micro_batch_like_distributed_sampler() -> None:
    keys = [(i, 1000 + i) for i in range(103)]
    batch = 5
    for size in (1, 2, 3, 4):
        count = len(keys) // (size * batch)
        shards = [shard_micro_batches(keys, batch, count, World(r, size)) for r in range(size)]
        for i in range(count):
            dealt = [k for shard in shards for k in shard[i]]
            assert all(len(shard[i]) == batch for shard in shards)
            assert sorted(dealt) == keys[i * size * batch : (i + 1) * size * batch]
        for rank, shard in enumerate(shards):
            sampler = DistributedSampler(keys, size, rank, shuffle=False, drop_last=True)
            expected = [keys[j] for j in sampler][: count * batch]
            assert [k for micro in shard for k in micro] == expected
    assert shard_micro_batches(keys, batch, 20, World()) == [
        keys[i * batch : (i + 1) * batch] for i in range(20)
    ]  # one process: the order of the single-process loop
    with pytest.raises(ValueError, match="do not fit"):
        shard_micro_batches(keys, batch, 11, World(0, 2))


def test_world_and_device_of_a_process() -> None:
    assert world_from_env({}) == World()
    assert world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    for env in ({"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "x"}):
        with pytest.raises(ValueError, match="torchrun environment"):
            world_from_env(env)
    two = World(1, 2, 1)
    assert process_device("cpu", two) == torch.device("cpu")
    with pytest.raises(ValueError, match="names one device"):
        process_device("cuda:0", two)
    if not torch.cuda.is_available():
        assert process_device("auto", two) == torch.device("cpu")
    assert rank_seed(7, 0) == 7  # rank 0 of a fresh run: the run's own seed
    seeds = {rank_seed(7, r, s) for r in range(8) for s in (0, 10, 20)}
    assert len(seeds) == 24


def _config(out: Path, batch_size: int, **kw: Any) -> PretrainConfig:
    """Pre-training without noise or masking: deterministic, so runs can be compared."""
    return PretrainConfig(
        data="digits:test", out=out, arch="digits", sigma=0.0, mask_ratio=0.0, epochs=3,
        warmup_epochs=1, batch_size=batch_size, blr=1.5e-3, progress=False, threads=1, **kw,
    )  # fmt: skip


class Killed(Exception):
    pass


def _kill_after_first_step(step: int) -> None:
    if step == 1:
        raise Killed


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model(path)[0].state_dict()


def _differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Largest |a - b| over the attention key biases, and over every other weight.

    A key bias has an exactly zero gradient (softmax is invariant to adding q.b_k to every
    logit), so Adam turns the rounding noise in it into steps of up to the lr: those weights
    agree only to ~lr between two exact computations; all others agree to float rounding.
    """
    keys, rest = 0.0, 0.0
    for name, x in a.items():
        diff = (x - b[name]).abs()
        if name.endswith("attn.qkv.bias"):
            d = diff.shape[0] // 3
            keys = max(keys, float(diff[d : 2 * d].max()))
            diff = torch.cat([diff[:d], diff[2 * d :]])
        rest = max(rest, float(diff.max()))
    return keys, rest


def test_torchrun_two_processes_continue_a_one_process_run_and_match_it(tmp_path: Path) -> None:
    """360 images, global batch 180: 2 optimiser steps per epoch, 6 in all. Run A: one process,
    batch 180, uninterrupted. Run B: one process, killed after step 1, then resumed by
    torchrun with 2 processes x batch 90 (the same global batch), which takes steps 2-6."""
    quiet = print if os.environ.get("DMAE_TEST_VERBOSE") else (lambda _: None)
    a = run_pretrain(_config(tmp_path / "a", 180), log=quiet)
    with pytest.raises(Killed):
        run_pretrain(
            _config(tmp_path / "b", 180, save_every_steps=1),
            log=quiet,
            after_step=_kill_after_first_step,
        )
    assert load_state(tmp_path / "b" / STATE_FILE)["step"] == 1
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = [
        str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2",
        str(BIN / "dmae-certify"), "train", "pretrain", "--data", "digits:test",
        "--arch", "digits", "--sigma", "0", "--mask-ratio", "0", "--epochs", "3",
        "--warmup-epochs", "1", "--batch-size", "90", "--blr", "1.5e-3", "--threads", "1",
        "--no-progress", "--save-every-steps", "1", "--resume", "--out", str(tmp_path / "b"),
    ]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout

    # rank 0 alone logs and writes: one line per epoch, one checkpoint, no per-rank files
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "checkpoint.safetensors", "log.jsonl", "state.pt",
    ]  # fmt: skip
    assert out.count("resumes on 2") == 1 and out.count("wrote ") == 1
    assert [out.count(f"epoch {e}/3 ") for e in (1, 2, 3)] == [1, 1, 1]
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    reference = [
        json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    ]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[0]["loss"] > log[1]["loss"] > log[2]["loss"]  # the loss decreases
    for mine, ref in zip(log[1:], reference[1:], strict=True):  # epochs run by 2 processes
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    meta = read_meta(tmp_path / "b" / "checkpoint.safetensors")
    t = meta.training
    assert t["world_size"] == 2 and t["effective_batch"] == 180 and t["steps"] == 6
    assert t["recipe"]["batch_size"] == 90 and t["recipe_name"] == "mae-all-patches"

    # the result is run A's up to float rounding; a run with another global batch is not
    b = _weights(tmp_path / "b" / "checkpoint.safetensors")
    key_bias, rest = _differences(b, _weights(a))
    assert rest < 1e-6 and key_bias < 1e-3, (rest, key_bias)  # 1e-3: about one step at peak lr
    other = run_pretrain(_config(tmp_path / "c", 90), log=quiet)
    assert _differences(b, _weights(other))[1] > 1e-3  # the check can fail
