"""Where decoding runs: the execution device of a (possibly accelerate-dispatched) model, generators, device syncs.

A base loaded with ``device_map="auto"`` or CPU/disk offload carries
accelerate's hooks (an ``_hf_hook`` attribute on its modules): the hook moves
inputs to the module's execution device and, for offloaded modules, loads the
weights just before the forward (the parameters themselves sit on the "meta"
device in between). Decoding then goes through the modules' own forward calls,
never reads their weights directly, and builds its masks and positions on the
execution device of the embedding.
"""

from __future__ import annotations

import torch
from torch import nn


def is_dispatched(module: nn.Module) -> bool:
    """Whether accelerate's hooks (``device_map`` / offload) sit on `module` or any module under it."""
    return any(hasattr(m, "_hf_hook") for m in module.modules())


def module_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device, else where its first parameter lives."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def execution_device(model) -> torch.device:
    """The device decoding builds its masks, positions and generators on: where the embedding runs.

    Example:
        >>> execution_device(model)  # doctest: +SKIP
        device(type='cuda', index=0)
    """
    return module_device(model.parts.embed_tokens)


def same_device(a: torch.device, b: torch.device) -> bool:
    """`a` and `b` are one device ("cuda" and "cuda:0" are, when the current device is 0)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        return True
    return a.index == b.index


def check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    """Refuse a generator that lives on another device than the tensors it draws for.

    Raises:
        ValueError: naming both devices and how to create the right generator.
    """
    if generator is None:
        return
    if not same_device(generator.device, device):
        raise ValueError(
            f"generator is on {generator.device} but the model decodes on {device}: a generator draws only for "
            f"tensors of its own device; create it there, e.g. torch.Generator(device={str(device)!r}).manual_seed(seed)"
        )


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on `device` seeded with `seed` (None: no generator, the global RNG is used).

    Example:
        >>> make_generator(0, "cpu").device
        device(type='cpu')
    """
    if seed is None:
        return None
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the device's queued work (CUDA, MPS, XPU); nothing to wait for on the CPU.

    Timers read the clock after this, so that they count the work and not only its launch.
    """
    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind == "mps":
        torch.mps.synchronize()
    elif kind == "xpu":
        torch.xpu.synchronize(device)
