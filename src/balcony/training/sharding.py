"""``strategy=fsdp``: FSDP2 (`fully_shard`) over the exits and the frozen base's decoder layers, and the full state dicts a checkpoint needs.

Under DDP every process holds the whole model: at 8B that is the bf16 base (16 GB) plus the
exits' float32 weights, gradients and AdamW state (10.5 GB for three exits). FSDP shards both
across the P processes: each process keeps 1/P of every exit and of every base decoder layer
and gathers a layer's weights only while it runs. The embedding, final norm and LM head stay
whole on every process (the loss reads the head's weight directly, chunk by chunk).

FSDP2 shards modules in place, so the references the training loop holds
(``model.parts.layers[i]``, ``model.exits[j]``) stay the modules that run. Parameters become
DTensor shards: saving gathers the full exit weights and optimizer state onto rank 0
(`full_exit_state`, `full_optimizer_state`), and a resume loads the exits whole before sharding
and scatters the optimizer state after (`load_optimizer_state`).

Supported for the frozen-base recipe ("balcony") in fp32 or bf16; the recipes that train the
base, and fp16 (which needs a sharded gradient scaler), are refused with a message.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..modeling.model import BalconyModel
from .config import TrainConfig


def check_fsdp(cfg: TrainConfig, num_processes: int, precision: str) -> None:
    """Refuse, with the reason, an FSDP run balcony does not support."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, torch >= 2.6)
    except ImportError as err:
        raise ValueError(f"strategy=fsdp needs torch >= 2.6 (FSDP2's fully_shard); this is torch {torch.__version__}") from err
    if cfg.recipe != "balcony":
        raise ValueError(f"strategy=fsdp shards the frozen-base recipe only ('balcony'), not recipe={cfg.recipe!r}: "
                         "that recipe trains the embedding and head too, which FSDP here keeps whole; use strategy=ddp")
    if precision == "fp16":
        raise ValueError("strategy=fsdp runs in fp32 or bf16, not fp16 (fp16 needs a sharded gradient scaler); use precision=bf16")
    if num_processes < 2:
        raise ValueError("strategy=fsdp shards across processes, and this run has one: launch with "
                         "`accelerate launch --multi_gpu --num_processes N`, or use strategy=ddp")


def shard(objective: nn.Module, model: BalconyModel, device: torch.device, num_processes: int) -> None:
    """Shard every exit and every base decoder layer across the processes; the rest of the model stays whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (num_processes,))
    for layer in model.parts.layers:
        fully_shard(layer, mesh=mesh)
    for exit_module in model.exits.values():
        fully_shard(exit_module, mesh=mesh)
    sharded = {id(p) for m in [*model.parts.layers, *model.exits.values()] for p in m.parameters()}
    whole = {p for p in objective.parameters() if id(p) not in sharded}
    fully_shard(objective, mesh=mesh, ignored_params=whole)


def full_exit_state(model: BalconyModel) -> dict[str, torch.Tensor]:
    """The exits' full weights (``exits.``-prefixed, as `save_pretrained` writes them) on rank 0; call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model.exits, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {f"exits.{k}": v for k, v in state.items()}


def full_optimizer_state(model: BalconyModel, optimizer) -> dict[str, Any]:
    """The optimizer's full state (keyed by parameter names) on rank 0; call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model.exits, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: BalconyModel, optimizer, state: dict[str, Any]) -> None:
    """Scatter a full optimizer state (from `full_optimizer_state`) onto the sharded optimizer; call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model.exits, optimizer, state, options=StateDictOptions(full_state_dict=True))
