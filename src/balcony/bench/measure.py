"""Timing and memory primitives for benchmarks: device-synchronised clocks, round-robin medians, peak memory, the matmul floor.

On an accelerator a kernel launch returns before the kernel ran, so every clock
read here (`now`) first waits for the device (`synchronize`); a timer that did
not would time the launches. Peak memory is the host's RSS on the CPU and the
allocator's peak on CUDA.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Callable

import torch

from ..inference.devices import synchronize
from ..modeling.model import BalconyModel


def now(device: torch.device | str | None = None) -> float:
    """`time.perf_counter()` after the device finished its queued work (a no-op wait on the CPU)."""
    synchronize(device)
    return time.perf_counter()


def _rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # Linux without psutil
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so the next RSS growth is that run's own."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS deltas then include memory reused from earlier runs
        pass


class PeakRSS:
    """Peak growth of the resident set size during a block, sampled by a thread.

    Example:
        >>> with PeakRSS() as mem:  # doctest: +SKIP
        ...     run()
        >>> mem.peak_mb  # doctest: +SKIP
    """

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        _release_free_memory()
        self.start = _rss_bytes()
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def peak_mb(self) -> float:
        """MiB the RSS rose above its level at the start."""
        return (self.peak - self.start) / 2**20


class PeakDeviceMemory:
    """Peak growth of CUDA memory allocated during a block (`torch.cuda.max_memory_allocated`), in `peak_mb`."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def __enter__(self) -> "PeakDeviceMemory":
        synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def peak_mb(self) -> float:
        """MiB allocated above the level at the start, at the peak."""
        return (self.peak - self.start) / 2**20


def peak_memory(device: torch.device | str | None = None) -> PeakRSS | PeakDeviceMemory:
    """The peak-memory meter for `device`: the allocator's on CUDA, the process RSS elsewhere."""
    if device is not None and torch.device(device).type == "cuda":
        return PeakDeviceMemory(device)
    return PeakRSS()


def memory_kind(device: torch.device | str | None = None) -> str:
    """What `peak_memory(device)` measures, in words (for reports)."""
    if device is not None and torch.device(device).type == "cuda":
        return "peak CUDA memory allocated (MiB) above the level before the run, during the untimed warm-up run"
    return (
        "peak RSS growth (MiB) over the level before the run, during the untimed warm-up run, sampled every 1 ms "
        "after returning freed heap memory to the OS (malloc_trim); weights are touched beforehand"
    )


def _wall(fn: Callable[[], object], device: torch.device | str | None = None) -> Callable[[], float]:
    """`fn` -> a function returning its wall time in seconds (device work included)."""

    def timed() -> float:
        t0 = now(device)
        fn()
        return now(device) - t0

    return timed


def run_cases(
    cases: dict[str, Callable[[], object]], repeats: int, log: Callable[[str], None] = print, device: torch.device | str | None = None
) -> tuple[dict, dict]:
    """Warm up every case once (measuring its peak RSS growth), then run them round-robin `repeats` times.

    Round-robin rather than case after case: on a shared machine the load
    drifts, and interleaving spreads the drift over every case alike.
    Each case times itself and returns what it measured.

    Returns:
        (case -> list of its `repeats` results, case -> peak memory growth in MiB, see `peak_memory`).
    """
    memory = {}
    for name, fn in cases.items():
        with peak_memory(device) as mem:
            fn()
        memory[name] = mem.peak_mb
    results: dict[str, list] = {name: [] for name in cases}
    for r in range(repeats):
        for name, fn in cases.items():
            results[name].append(fn())
        log(f"[bench] round {r + 1}/{repeats} done")
    return results, memory


def matmul_floor_s(model: BalconyModel, repeats: int = 5) -> float:
    """Seconds of the weight matmuls alone for one full-depth token at batch 1 (every nn.Linear of the layers + head).

    Decoding one token streams every weight once; this is that cost with no
    attention, norms, Python or sampling, a floor no batch-1 decoder goes under.
    """
    from ..inference.quantize import QUANTIZED

    kinds = (torch.nn.Linear, *QUANTIZED)
    linears = [mod for layer in model.parts.layers for mod in layer.modules() if isinstance(mod, kinds)]
    linears.append(model.parts.lm_head)
    x = {}
    emb = model.parts.embed_tokens.weight
    device = emb.device
    with torch.no_grad():
        for mod in linears:  # inputs of the right width, made outside the timed loop
            x.setdefault(mod.in_features, torch.randn(1, 1, mod.in_features, dtype=emb.dtype, device=emb.device))
        times = []
        for _ in range(repeats + 1):
            t0 = now(device)
            for mod in linears:
                if type(mod) is torch.nn.Linear:
                    torch.nn.functional.linear(x[mod.in_features], mod.weight, mod.bias)
                else:  # a quantized layer: its kernel and casts
                    mod(x[mod.in_features])
            times.append(now(device) - t0)
    return statistics.median(times[1:])
