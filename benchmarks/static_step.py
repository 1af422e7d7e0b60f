"""Decode speed of the static decode step against the dynamic one it replaced, side by side in one run.

Three steps, the same greedy decode, round-robin, on the embedded model (or --model):

* dynamic: `forward_budget` on one token (K/V sliced to the filled length, positions as Python ints):
  the decode step balcony used before;
* eager: `decode_one_token` as eager decoding runs it (position from a device tensor, cache written at a
  device index, keys up to the filled length);
* whole: the shapes compiled decoding uses (the whole pre-sized cache and a validity mask), run eagerly.

It prints tok/s per batch size, the ratios to the dynamic step, and whether all three chose the same tokens.

    python benchmarks/static_step.py --batch-sizes 1,8   # on a shared machine: under flock /work/locks/bench.lock
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from balcony import BalconyConfig, BalconyModel
from balcony.bench.measure import now
from balcony.bench.speed import make_prompt
from balcony.inference.cache import budget_slots
from balcony.inference.engine import _static_step, decode_one_token, forward_budget, prefill
from balcony.inference.spans import new_state
from balcony.modeling.loading import load_base, pick_device


def decode(model: BalconyModel, ids: torch.Tensor, new: int, variant: str) -> tuple[float, torch.Tensor]:
    """(seconds of the `new` - 1 decode steps, (B, new) greedy tokens) at full depth."""
    j = model.num_layers
    state = new_state(model, budget_slots(model, j), ids.shape[0], ids.shape[1] + new)
    with torch.no_grad():
        token = prefill(model, state, ids, j).argmax(-1)
        out = [token]
        t0 = now(ids.device)
        for _ in range(new - 1):
            if variant == "dynamic":
                logits = forward_budget(model, state, token[:, None], j)[:, -1]
            else:
                logits = decode_one_token(model, state, token, j, _static_step if variant == "whole" else None)
            token = logits.argmax(-1)
            out.append(token)
        return now(ids.device) - t0, torch.stack(out, 1)


VARIANTS = ("dynamic", "eager", "whole")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    base, tok = load_base(args.model, device=device)
    model = BalconyModel(base, BalconyConfig(exit_layers=[14, 17, 20] if args.model is None else None))
    print(f"{model.config.base_model_name_or_path} on {device}, {torch.get_num_threads()} threads; prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new, median of {args.repeats} runs")
    print(f"{'batch':>6}{'dynamic tok/s':>15}{'eager tok/s':>13}{'whole tok/s':>13}{'eager/dynamic':>15}{'whole/dynamic':>15}  same tokens")
    for b in (int(x) for x in args.batch_sizes.split(",")):
        ids = make_prompt(tok, args.prompt_tokens, b).to(device)
        for v in VARIANTS:
            decode(model, ids, 4, v)  # warm-up
        times = {v: [] for v in VARIANTS}
        same = True
        for _ in range(args.repeats):
            toks = {}
            for v in VARIANTS:  # round-robin: drift on a shared machine hits all alike
                seconds, toks[v] = decode(model, ids, args.new_tokens, v)
                times[v].append(seconds)
            same &= torch.equal(toks["eager"], toks["dynamic"]) and torch.equal(toks["whole"], toks["dynamic"])
        rate = {v: b * (args.new_tokens - 1) / statistics.median(t) for v, t in times.items()}
        print(f"{b:>6}{rate['dynamic']:>15.1f}{rate['eager']:>13.1f}{rate['whole']:>13.1f}"
              f"{rate['eager'] / rate['dynamic']:>14.3f}x{rate['whole'] / rate['dynamic']:>14.3f}x  {same}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
