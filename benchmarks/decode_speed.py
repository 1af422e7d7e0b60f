"""Decode-speed benchmark: a thin wrapper around `balcony bench` (same options).

Usage:
    python benchmarks/decode_speed.py --threads 1                      # the embedded SmolLM2-135M
    python benchmarks/decode_speed.py --max-new-tokens 8 --repeats 1   # CI-sized
    python benchmarks/decode_speed.py --threads 1 --quantize int8      # + int8 weights: engine and HF generate, quality
    python benchmarks/decode_speed.py --threads 1 --quantize int4 --compile --no-speculative
    python benchmarks/decode_speed.py --model HuggingFaceTB/SmolLM2-360M-Instruct --exit-layers 12,16,20
"""

from __future__ import annotations

import sys

from balcony.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
