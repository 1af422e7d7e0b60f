"""Processes, devices and precision of a training run: the Accelerator, even sharding of rows, checks that every rank agrees.

Training runs as one process or as several under ``accelerate launch`` (one per GPU, or CPU
processes over gloo). Everything here makes the several-process run the same computation as
one process with the same global batch:

- micro-batch k of an epoch is a slice of one global, seeded row order: rank r takes rows
  ``order[(k * P + r) * B : (k * P + r + 1) * B]`` (`rank_rows`), so P processes with batch B
  see exactly the rows one process with batch P * B sees, and every rank has the same number
  of micro-batches per epoch (the global rows divided by P * B), so none takes a step the
  others don't;
- `same_on_every_rank` stops a run whose ranks read different data (a cache written while
  another rank read it, say) with a message instead of a silent divergence or a hang.
"""

from __future__ import annotations

import hashlib
import os
import resource
import sys
from datetime import timedelta
from typing import Any

import torch

from ..modeling.loading import pick_device
from .config import TrainConfig

# Rank 0 prepares the data (corpus generation, tokenisation) while the others wait in a barrier:
# the default 10-minute NCCL timeout would kill a run whose tokenisation takes longer.
PREPARE_TIMEOUT = timedelta(hours=2)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PRECISION_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(cfg: TrainConfig) -> str:
    """The device type this run trains on: `cfg.device`, or CUDA, then MPS, else the CPU."""
    device = pick_device(cfg.device)
    if device == "cpu" and cfg.device in (None, "", "auto") and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        device = "mps"
    return device


def resolve_precision(cfg: TrainConfig, device: str) -> tuple[str, torch.dtype]:
    """(autocast precision, dtype of the frozen base) for `cfg` on `device`.

    ``precision="auto"`` is bf16 on a device that supports it (CUDA with bf16), else follows an
    explicit low-precision ``dtype``, else fp32. ``dtype="auto"`` is the precision's dtype for a
    frozen base (the teacher runs in bf16 on a GPU, half the memory of float32) and float32 for
    recipes that train the base (they keep float32 master weights).

    Example:
        >>> resolve_precision(TrainConfig(precision="bf16"), "cpu")
        ('bf16', torch.bfloat16)
    """
    precision = cfg.precision
    if precision == "auto":
        if cfg.dtype in ("bfloat16", "float16"):
            precision = {"bfloat16": "bf16", "float16": "fp16"}[cfg.dtype]
        elif device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            precision = "bf16"
        else:
            precision = "fp32"
    if cfg.dtype != "auto":
        dtype = _DTYPES[cfg.dtype]
    else:
        dtype = _PRECISION_DTYPE[precision] if cfg.recipe == "balcony" else torch.float32
    if dtype != torch.float32 and precision == "fp32":
        raise ValueError(f"dtype={cfg.dtype!r} needs a bf16/fp16 precision (autocast); precision resolved to 'fp32'")
    return precision, dtype


def make_accelerator(cfg: TrainConfig, device: str, precision: str):
    """The run's Accelerator: gloo processes on CPU, one GPU per process otherwise; refuses what balcony cannot run.

    DDP is told that every buffer is a constant (no broadcast before each forward) and to keep
    gradients as views into its communication buckets (no second copy of the exits' gradients).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

    # Accelerate keeps its settings in process-wide singletons: a second `train` in one process (a notebook,
    # a test session) with another precision or device would be refused. The process group, if any, stays.
    AcceleratorState._reset_state(reset_partial_state=not torch.distributed.is_initialized())
    GradientState._reset_state()
    if device.startswith("cuda:") and not torch.distributed.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(torch.device(device))  # Accelerate places a single process on the current CUDA device
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True),
                InitProcessGroupKwargs(timeout=PREPARE_TIMEOUT)]
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision), cpu=device == "cpu",
                              kwargs_handlers=handlers)
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise ValueError("balcony does not run under DeepSpeed (it was never tested there: its ZeRO stages replace the modules "
                         "the training loop calls by reference); launch with plain `accelerate launch --multi_gpu` and, to shard, "
                         "set strategy=fsdp in the training config")
    if kind in (DistributedType.FSDP, getattr(DistributedType, "XLA", None)):
        raise ValueError(f"accelerate is configured for {kind.value}: balcony shards with FSDP itself (strategy=fsdp in the training "
                         "config); launch with plain `accelerate launch --multi_gpu --num_processes N` instead")
    if accelerator.num_processes > 1 and device.startswith("cuda:"):
        raise ValueError(f"device={device!r} names one GPU, but {accelerator.num_processes} processes are running: each takes its own "
                         "GPU; leave device unset (or 'cuda')")
    return accelerator


def micro_batches_per_epoch(num_rows: int, batch_size: int, num_processes: int) -> int:
    """Micro-batches each rank runs per epoch: the global rows over the global micro-batch (the tail is dropped).

    Example:
        >>> micro_batches_per_epoch(7, 1, 2)  # 7 rows, 2 ranks of 1 row: 3 on each, row 7 waits for the next epoch
        3
    """
    return num_rows // (batch_size * num_processes)


def rank_rows(order: torch.Tensor, k: int, batch_size: int, rank: int, num_processes: int) -> torch.Tensor:
    """Rows of micro-batch `k` on `rank`: its slice of the global micro-batch ``order[k*P*B : (k+1)*P*B]``.

    Example:
        >>> rank_rows(torch.arange(10), 1, 2, 1, 2).tolist()  # global micro-batch 1 is rows 4..7; rank 1 takes 6, 7
        [6, 7]
    """
    start = (k * num_processes + rank) * batch_size
    return order[start : start + batch_size]


def fingerprint_rows(input_ids: torch.Tensor) -> int:
    """A 63-bit hash of token rows, to check that every rank holds the same data."""
    digest = hashlib.sha256(input_ids.contiguous().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def same_on_every_rank(accelerator, what: str, values: list[int]) -> None:
    """Raise (on every rank) when the ranks hold different `values` (e.g. row count and data hash)."""
    if accelerator.num_processes == 1:
        return
    mine = torch.tensor(values, dtype=torch.long, device=accelerator.device)
    every = accelerator.gather(mine[None]).cpu()  # (P, len(values))
    if not bool((every == every[0]).all()):
        raise RuntimeError(f"the processes disagree on {what}: " + "; ".join(f"rank {r}: {row.tolist()}" for r, row in enumerate(every))
                           + ". Every rank must read the same prepared data (is the cache directory shared and complete?)")


def ignore_frozen_in_ddp(objective: torch.nn.Module) -> None:
    """Keep the frozen base out of DDP's start-up broadcast (every rank loaded the same weights: 16 GB at 8B in bf16)."""
    from torch.nn.parallel import DistributedDataParallel

    names = [n for n, p in objective.named_parameters() if not p.requires_grad] + [n for n, _ in objective.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(objective, names)


def peak_memory(device: torch.device | str) -> dict[str, Any]:
    """Peak memory so far: CUDA's allocated bytes on a GPU, else the process's peak resident set."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9, "mem_kind": "cuda_max_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"peak_mem_gb": rss / 1e9, "mem_kind": "process_max_rss"}


def rng_state() -> dict:
    """This process's random generators: Python, torch's CPU and, when CUDA exists, every CUDA device's."""
    import random

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state`'s generators (the CUDA ones when both the checkpoint and this machine have them)."""
    import random

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
