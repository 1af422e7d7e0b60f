"""Resumable checkpoints: exit weights, optimizer, scheduler, RNG and data position, written atomically."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from ..modeling.model import BalconyModel


def _rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint-<step>`` directory, or None."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(path: Path, model: BalconyModel, optimizer, scheduler, state: dict) -> None:
    """Exit weights (or the whole model when it trains), optimizer, scheduler, RNG and data position.

    Written to a temporary directory and renamed, so a kill mid-save never leaves a
    checkpoint that looks complete.
    """
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    if model.base_trainable:
        model.base.save_pretrained(tmp / "base")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()}, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: BalconyModel, optimizer, scheduler) -> dict:
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
    blob = torch.load(path / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    _set_rng_state(blob["rng"])
    return json.loads((path / "trainer_state.json").read_text())


def _checkpoint(accelerator, out_dir: Path, model, optimizer, scheduler, state, keep: int) -> None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    save_checkpoint(out_dir / f"checkpoint-{state['step']}", model, optimizer, scheduler, state)
    old = sorted((p for p in out_dir.glob("checkpoint-*") if not p.name.endswith(".tmp")), key=lambda p: int(p.name.split("-")[1]))
    for p in old[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
