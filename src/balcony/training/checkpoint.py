"""Resumable checkpoints: exit weights, optimizer, scheduler, every rank's RNG and the data position, written atomically.

A checkpoint always sits on an optimizer-step boundary: the trainer state it holds is the one
at the start of the accumulation window in progress (`balcony.training.loop`), so a run
stopped halfway through a window redoes that window's micro-batches and ends bitwise where an
uninterrupted run ends. Each rank writes its own random-generator state (CPU, and every CUDA
device's when there is CUDA) next to the weights that rank 0 writes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..modeling.model import BalconyModel
from .distributed import rng_state, set_rng_state

RNG_FILE = "rng_state_{rank}.pt"


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint-<step>`` directory, or None."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def write_exits(directory: Path, model: BalconyModel, exit_state: dict[str, torch.Tensor] | None = None) -> None:
    """`model.save_pretrained`, or, for sharded exits, the same files from their gathered full weights."""
    if exit_state is None:
        model.save_pretrained(directory)
        return
    from safetensors.torch import save_file

    from ..modeling.config import WEIGHTS_NAME

    os.makedirs(directory, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in exit_state.items()}, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
    model.config.save(directory)


def _write_weights(tmp: Path, model: BalconyModel, optimizer_state: dict, scheduler, state: dict,
                   exit_state: dict[str, torch.Tensor] | None = None) -> None:
    write_exits(tmp, model, exit_state)
    if model.base_trainable:
        model.base.save_pretrained(tmp / "base")
    keys = "ids" if exit_state is None else "names"  # torch's optimizer.state_dict() vs a gathered FSDP one
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "optimizer_keys": keys}, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))


def save_checkpoint(path: Path, model: BalconyModel, optimizer, scheduler, state: dict, rng: dict | None = None) -> None:
    """One process's checkpoint: exits (or the whole model when it trains), optimizer, scheduler, RNG and data position.

    Written to a temporary directory and renamed, so a kill mid-save never leaves a
    checkpoint that looks complete.

    Args:
        path: The ``checkpoint-<step>`` directory.
        model, optimizer, scheduler: What to save.
        state: The trainer state (step, data position, ...), at an optimizer-step boundary.
        rng: The generators' state that goes with `state` (default: now).
    """
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save(rng or rng_state(), tmp / RNG_FILE.format(rank=0))
    _write_weights(tmp, model, optimizer.state_dict(), scheduler, state)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def read_checkpoint(path: Path, model: BalconyModel, rank: int = 0) -> tuple[dict, dict]:
    """Load a checkpoint's weights into `model` and set this rank's RNG; returns (trainer state, optimizer/scheduler blob).

    The optimizer and scheduler states are left to the caller, so that a sharded run can load
    its exits whole first and scatter the optimizer state once its parameters are sharded.
    """
    from ..modeling.config import BalconyConfig

    saved = BalconyConfig.load(path)
    if saved.exit_layers != model.config.exit_layers:
        raise ValueError(f"checkpoint {path} has exits {saved.exit_layers}, this run has {model.config.exit_layers}: use another output_dir or resume=false")
    model.load_exits(path)
    if model.base_trainable and (path / "base").is_dir():
        from safetensors.torch import load_file

        state = {}
        for f in sorted((path / "base").glob("*.safetensors")):
            state.update(load_file(f))
        model.base.load_state_dict(state, strict=False)
    # map_location: a GPU checkpoint would otherwise land on the GPU rank 0 saved it from, on every rank.
    blob = torch.load(path / "optimizer.pt", weights_only=False, map_location="cpu")
    mine = path / RNG_FILE.format(rank=rank)
    if mine.is_file():
        set_rng_state(torch.load(mine, weights_only=False))
    elif "rng" in blob:  # checkpoints written before per-rank RNG files
        set_rng_state(blob["rng"])
    return json.loads((path / "trainer_state.json").read_text()), blob


def load_checkpoint(path: Path, model: BalconyModel, optimizer, scheduler, rank: int = 0) -> dict:
    """Load a (one-process or DDP) checkpoint into this process's model, optimizer and scheduler, and set its RNG.

    Returns:
        The trainer state (step, data position, ...).
    """
    state, blob = read_checkpoint(path, model, rank)
    if blob.get("optimizer_keys", "ids") != "ids":
        raise ValueError(f"checkpoint {path} was written by an FSDP run (strategy=fsdp): resume it with strategy=fsdp")
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    return state


def _checkpoint(accelerator, out_dir: Path, model, optimizer, scheduler, state: dict, rng: dict, keep: int, sharded: bool = False) -> None:
    """Every rank's part of a checkpoint: its RNG file (and, sharded, its shards for the gather); rank 0 writes the rest."""
    path = out_dir / f"checkpoint-{state['step']}"
    tmp = path.with_name(path.name + ".tmp")
    main = accelerator.is_main_process
    exit_state = None
    if sharded:
        from .sharding import full_exit_state, full_optimizer_state

        exit_state, optimizer_state = full_exit_state(model), full_optimizer_state(model, optimizer)
    else:
        optimizer_state = optimizer.state_dict() if main else None
    accelerator.wait_for_everyone()
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng, tmp / RNG_FILE.format(rank=accelerator.process_index))
    accelerator.wait_for_everyone()
    if main:
        _write_weights(tmp, model, optimizer_state, scheduler, state, exit_state)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        old = sorted((p for p in out_dir.glob("checkpoint-*") if not p.name.endswith(".tmp")), key=lambda p: int(p.name.split("-")[1]))
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
