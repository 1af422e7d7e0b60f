"""Training throughput and memory of the exits, side by side with the compute limit, in one run.

    python benchmarks/train_throughput.py                  # embedded model, B=8, S=256, 3 exits
    python benchmarks/train_throughput.py --steps 3 --batch-size 2 --seq-len 64   # a quick look

What it prints (warm-up steps excluded, medians over the timed steps; forward, train and cached
steps are timed in turns, one of each per round, so a drift in machine speed hits all alike):
- forward: a frozen no-grad forward of the base at the same batch (tokens/s);
- limit: that throughput scaled by the FLOP ratio
  forward / (forward + E x (exit layer fwd+bwd + LM head fwd + head input-grad bwd)),
  i.e. what training could reach if the extra work ran as fast as the forward;
- train: a real training step (one frozen pass feeding every exit, the chunked loss,
  backward, AdamW), as tokens/s and as a fraction of the limit;
- cached: the same step on cached frozen-pass features (`cache_features: true`), which
  skips the base entirely and so may exceed the limit;
- peak memory (max RSS of a fresh process doing the training steps) with E exits and with
  1 exit, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def flops_per_token(model, n_exits: int, seq_len: int) -> tuple[float, float]:
    """(forward FLOPs, extra training FLOPs) per token, from parameter counts (2 FLOPs per MAC)."""
    cfg = model.base.config
    layer = sum(p.numel() for p in model.parts.layers[0].parameters())
    head = model.parts.lm_head.weight.numel()
    attn = 2 * 2 * seq_len / 2 * cfg.hidden_size  # QK^T and AV over the causal half, per layer
    fwd = model.num_layers * (2 * layer + attn) + 2 * head
    exit_layer = sum(p.numel() for p in next(iter(model.exits.values())).parameters())
    extra = n_exits * (3 * (2 * exit_layer + attn) + 2 * head + 2 * head)
    return fwd, extra


def median_times(fns: dict, steps: int, warmup: int) -> dict:
    """Median seconds of each function, timed in turns (one call of each per round).

    Interleaving keeps the ratios honest on a machine whose speed drifts: a slow spell
    slows every function alike instead of whichever happened to run then.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def build(n_exits: int, args):
    from balcony import BalconyConfig, BalconyModel, load_base
    from balcony.training.config import TrainConfig
    from balcony.training.objective import DistillObjective

    base, _ = load_base(args.model)
    layers = [14, 17, 20][:n_exits] if args.model is None else None
    if layers is None:
        from balcony.modeling.loading import default_exit_layers

        layers = default_exit_layers(base.config.num_hidden_layers)[:n_exits]
    model = BalconyModel(base, BalconyConfig(exit_layers=layers))
    model.checkpoint_exits = args.checkpoint_exits
    objective = DistillObjective(model, TrainConfig(chunk_size=args.chunk_size))
    opt = torch.optim.AdamW([p for p in model.exits.parameters()], lr=5e-4)
    return model, objective, opt


def train_step_fn(objective, opt, batch):
    def step():
        loss, _ = objective(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.model.exits.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_probe(args) -> None:
    """Child process: a few training steps, then print the peak RSS (MB) reached while training.

    Loading the checkpoint briefly holds two copies of the weights; writing 5 to
    /proc/self/clear_refs resets the kernel's peak (VmHWM) after loading, so the number is
    the training peak: weights + exits + optimizer state + activations + loss chunks.
    """
    model, objective, opt = build(args.exits, args)
    ids = torch.randint(0, model.base.config.vocab_size, (args.batch_size, args.seq_len))
    model.train()
    step = train_step_fn(objective, opt, {"input_ids": ids})
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    for _ in range(2):
        step()
    print(json.dumps({"peak_rss_mb": _status_mb("VmHWM")}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--exits", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--checkpoint-exits", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute exit activations in backward, as training does by default (TrainConfig.checkpoint_exits)")
    args = p.parse_args()
    if args.memory_probe:
        memory_probe(args)
        return

    from balcony.training.features import build_feature_cache
    from balcony.training.packing import PackedData

    model, objective, opt = build(args.exits, args)
    b, s = args.batch_size, args.seq_len
    tokens = b * s
    ids = torch.randint(0, model.base.config.vocab_size, (b, s))
    rows = PackedData(ids.int(), torch.arange(s).repeat(b, 1).int())
    feats = build_feature_cache(model, rows, batch_size=b, progress=False)
    cached_batch = feats.batch(torch.arange(b), torch.float32)

    def forward():
        with torch.no_grad():
            model.base(ids)

    model.train()
    t = median_times({"forward": forward, "train": train_step_fn(objective, opt, {"input_ids": ids}),
                      "cached": train_step_fn(objective, opt, cached_batch)}, args.steps, args.warmup)
    fwd_tps, train_tps, cached_tps = tokens / t["forward"], tokens / t["train"], tokens / t["cached"]
    fwd_flops, extra_flops = flops_per_token(model, args.exits, s)
    limit = fwd_tps * fwd_flops / (fwd_flops + extra_flops)

    result = {
        "model": model.config.base_model_name_or_path, "exits": model.config.exit_layers, "batch": [b, s],
        "threads": torch.get_num_threads(),
        "forward_tokens_per_s": round(fwd_tps, 1),
        "flop_ratio": round(fwd_flops / (fwd_flops + extra_flops), 4),
        "limit_tokens_per_s": round(limit, 1),
        "train_tokens_per_s": round(train_tps, 1),
        "train_over_limit": round(train_tps / limit, 3),
        "train_over_forward": round(train_tps / fwd_tps, 3),
        "cached_tokens_per_s": round(cached_tps, 1),
        "cached_over_limit": round(cached_tps / limit, 3),
    }
    if not args.skip_memory:
        peaks = {}
        for n in (args.exits, 1):
            cmd = [sys.executable, __file__, "--memory-probe", "--exits", str(n), "--batch-size", str(b), "--seq-len", str(s),
                   "--chunk-size", str(args.chunk_size)] + (["--checkpoint-exits"] if args.checkpoint_exits else ["--no-checkpoint-exits"]) + (["--model", args.model] if args.model else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            peaks[n] = json.loads(out)["peak_rss_mb"]
        result.update({f"peak_rss_mb_{args.exits}_exits": round(peaks[args.exits]), "peak_rss_mb_1_exit": round(peaks[1]),
                       "peak_ratio": round(peaks[args.exits] / peaks[1], 3)})
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
