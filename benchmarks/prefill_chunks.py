"""Prefill time in one pass against chunked prefill (`DecodeOptions.prefill_chunk`), on one prompt.

Rounds interleave the variants (one pass, then each chunk size), so drift in the machine's speed hits
them alike; the minimum over rounds is compared. Chunks let the server drop a request between them
(see docs/serving.md); this measures what they cost.

Example:
    flock /work/locks/bench.lock python benchmarks/prefill_chunks.py --tokens 1024 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from balcony.cli.common import build_model
from balcony.inference.cache import budget_slots
from balcony.inference.engine import prefill
from balcony.inference.spans import new_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Base model (default: the embedded SmolLM2-135M-Instruct).")
    parser.add_argument("--tokens", type=int, default=1024, help="Prompt length.")
    parser.add_argument("--chunks", default="256,512", help="Chunk sizes, comma-separated.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _, _ = build_model(args.model, None)
    x = torch.randint(100, 40000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    j = model.num_layers
    times: dict[int | None, list[float]] = {None: [], **{int(c): [] for c in args.chunks.split(",")}}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for chunk in times:
                state = new_state(model, budget_slots(model, j), 1, args.tokens + 8)
                t0 = time.perf_counter()
                prefill(model, state, x, j, chunk=chunk)
                times[chunk].append(time.perf_counter() - t0)
                print(f"chunk={chunk}: {times[chunk][-1]:.2f} s", flush=True)
    base = min(times[None])
    print(f"\n{args.tokens} tokens, {torch.get_num_threads()} thread(s), min of {args.rounds} rounds")
    for chunk, t in times.items():
        print(f"  {'one pass' if chunk is None else f'chunks of {chunk}':<16}{min(t):7.2f} s  x{min(t) / base:.2f}")


if __name__ == "__main__":
    main()
