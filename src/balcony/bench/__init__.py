"""Speed and memory: `balcony bench` per budget against HF `generate`, self-speculative decoding and quantized weights."""

from .report import format_table, plot
from .speed import run_bench

__all__ = ["format_table", "plot", "run_bench"]
