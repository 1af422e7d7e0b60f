"""Which training levers help an exit most per step: one frozen pass, every recipe side by side.

    python benchmarks/recipe_ablation.py                       # exit 14 of the embedded model, 200k tokens
    python benchmarks/recipe_ablation.py --exit 20 --tokens 100000 --variants paper,lstsq-kl-2e-3
    python benchmarks/recipe_ablation.py --tokens 16384 --eval-tokens 2048   # a quick look

The frozen pass over the training tokens is cached once and every variant starts
from the same exit init, trains the same number of steps on the same rows, and is
scored on the same held-out rows (KL(full || exit) and top-1 agreement). Variants:

- ``paper``: KL from the start, last-layer init, lr 5e-4 (the paper's recipe);
- ``mse-5e-4`` / ``mse-2e-3``: logit-MSE warm-up for 28% of the steps, then KL;
- ``lstsq-kl-<lr>``: closed-form warm start (`balcony.warmstart`), then KL;
- ``lstsq-only``: the warm start alone, no steps;
- ``identity-kl-2e-3``: identity init (output projections zeroed), then KL;
- ``lstsq-kl-2e-3-v8192``: as ``lstsq-kl-2e-3`` with the loss over the 8192 vocabulary
  entries that carry the most teacher mass (``loss_vocab``), the same steps;
  ``lstsq-kl-2e-3-v8192-x4``: the same over 4 epochs (about the wall time of one
  full-vocabulary epoch). Any ``lstsq-kl-<lr>[-v<k>][-x<epochs>]`` is understood, e.g.
  ``lstsq-kl-2e-3-v4096-x13``.

``--text FILE`` also scores every variant on text the training never saw (e.g. LAMBADA jsonl).

Prints one JSON line per variant and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch

# lstsq-kl-<lr>[-v<k>][-x<epochs>] names are read by `variant`.
VARIANTS = {
    "paper": dict(lr=5e-4),
    "mse-5e-4": dict(lr=5e-4, warmup=0.28),
    "mse-2e-3": dict(lr=2e-3, warmup=0.28),
    "lstsq-only": dict(init="lstsq", steps=0),
    "identity-kl-2e-3": dict(init="identity", lr=2e-3),
}

_PATTERN = re.compile(r"lstsq-kl-(?P<lr>[0-9.e-]+?)(?:-v(?P<vocab>\d+))?(?:-x(?P<epochs>[0-9.]+))?")


def variant(name: str) -> dict | None:
    """The settings of a variant name, or None when it is not one."""
    if name in VARIANTS:
        return VARIANTS[name]
    m = _PATTERN.fullmatch(name)
    if m is None:
        return None
    v = dict(init="lstsq", lr=float(m["lr"]))
    if m["vocab"]:
        v["vocab"] = int(m["vocab"])
    if m["epochs"]:
        v["epochs"] = float(m["epochs"])
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--dataset", default=None, help="training text (default: the generated default corpus)")
    ap.add_argument("--exit", type=int, default=14)
    ap.add_argument("--tokens", type=int, default=200_000, help="training tokens (one epoch)")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--variants", default="paper,mse-5e-4,mse-2e-3,lstsq-only,lstsq-kl-2e-3,lstsq-kl-4e-3",
                    help=f"comma-separated, from {sorted(VARIANTS)} or lstsq-kl-<lr>[-v<k>][-x<epochs>]")
    ap.add_argument("--text", default=None, help="also score on this text file (txt/jsonl), e.g. LAMBADA")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    names = args.variants.split(",")
    for n in names:
        if variant(n) is None:
            raise SystemExit(f"unknown variant {n!r}; choose from {sorted(VARIANTS)} or lstsq-kl-<lr>[-v<k>][-x<epochs>]")
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import get_cosine_schedule_with_warmup

    from balcony.training.config import TrainConfig
    from balcony.training.data import epoch_order
    from balcony.training.evaluate import distill_metrics
    from balcony.training.features import build_feature_cache
    from balcony.training.loop import build_training_model, load_training_data
    from balcony.training.losses import teacher_vocab
    from balcony.training.objective import DistillObjective
    from balcony.training.warmstart import lstsq_warm_start

    base_cfg = dict(model=args.model, dataset=args.dataset, exit_layers=[args.exit], seq_len=args.seq_len, batch_size=args.batch_size,
                    eval_tokens=args.eval_tokens, corpus_tokens=max(args.tokens + args.eval_tokens, 300_000), progress=False)
    cfg = TrainConfig(**base_cfg)
    model, tok = build_training_model(cfg)
    train_rows, eval_rows = load_training_data(cfg, tok, model)
    rows = min(len(train_rows), max(args.batch_size, args.tokens // args.seq_len))
    train_rows = train_rows._rows(slice(0, rows))
    t0 = time.perf_counter()
    feats = build_feature_cache(model, train_rows, batch_size=args.batch_size, progress=True)
    print(f"frozen pass over {rows * args.seq_len:,} tokens cached in {time.perf_counter() - t0:.0f} s", flush=True)
    eval_batches = [eval_rows[slice(s, s + args.batch_size)] for s in range(0, len(eval_rows), args.batch_size)]
    text_batches = []
    if args.text:  # packed like the held-out rows, so both are scored the same way
        from balcony.eval.texts import load_texts
        from balcony.training.packing import tokenize_and_pack

        text_rows = tokenize_and_pack(load_texts(args.text), tok, args.seq_len, max_tokens=args.eval_tokens)
        if len(text_rows) == 0:
            raise SystemExit(f"--text {args.text}: fewer than seq_len={args.seq_len} tokens")
        text_batches = [text_rows[slice(s, s + args.batch_size)] for s in range(0, len(text_rows), args.batch_size)]
    exit = model.exits[str(args.exit)]
    init_state = {k: v.clone() for k, v in exit.state_dict().items()}
    steps_per_epoch = rows // args.batch_size

    results = []
    for name in names:
        v = variant(name)
        exit.load_state_dict(init_state)
        if v.get("init") == "identity":
            with torch.no_grad():
                for proj in model.parts.family.residual_out:
                    exit.layer.get_submodule(proj).weight.zero_()
        t0 = time.perf_counter()
        if v.get("init") == "lstsq":
            lstsq_warm_start(model, feats, [args.exit], batch_size=args.batch_size)
        lr = v.get("lr", 5e-4)
        objective = DistillObjective(model, TrainConfig(**base_cfg, lr=lr))
        if v.get("vocab"):
            head_w = model.parts.lm_head.weight
            idx, _ = teacher_vocab(head_w, feats.teacher[: max(1, TrainConfig.loss_vocab_tokens // args.seq_len)], v["vocab"])
            objective.set_loss_vocab(idx)
        params = [p for p in exit.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))
        total = v.get("steps", int(steps_per_epoch * v.get("epochs", 1)))
        sched = get_cosine_schedule_with_warmup(opt, int(0.05 * total), max(total, 1))
        warm = int(v.get("warmup", 0.0) * total)
        model.train()
        for step in range(total):
            epoch, k = divmod(step, steps_per_epoch)
            if k == 0:  # a fresh shuffle per epoch
                order = epoch_order(rows, seed=0, epoch=epoch)
            idx = order[k * args.batch_size:(k + 1) * args.batch_size]
            loss, _ = objective(feats.batch(idx, torch.float32), phase="warmup" if step < warm else "main")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        secs = time.perf_counter() - t0
        model.eval()
        m = distill_metrics(model, eval_batches, exits=[args.exit])[args.exit]
        row = {"variant": name, "exit": args.exit, "steps": total, "tokens": total * args.batch_size * args.seq_len, "seconds": round(secs, 1),
               "kl": round(m["kl"], 3), "agreement": round(m["agreement"], 4)}
        if text_batches:
            t = distill_metrics(model, text_batches, exits=[args.exit])[args.exit]
            row.update(text_kl=round(t["kl"], 3), text_agreement=round(t["agreement"], 4))
        results.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nexit {args.exit}, {steps_per_epoch} steps of {args.batch_size}x{args.seq_len} tokens, held-out {len(eval_rows) * args.seq_len:,} tokens")
    text = f" {'text KL':>8} {'agree':>7}" if text_batches else ""
    print(f"{'variant':<24} {'steps':>5} {'seconds':>8} {'KL':>7} {'agree':>7}{text}")
    for r in results:
        line = f"{r['variant']:<24} {r['steps']:>5} {r['seconds']:>8.0f} {r['kl']:>7.3f} {100 * r['agreement']:>6.1f}%"
        if text_batches:
            line += f" {r['text_kl']:>8.3f} {100 * r['text_agreement']:>6.1f}%"
        print(line)


if __name__ == "__main__":
    main()
