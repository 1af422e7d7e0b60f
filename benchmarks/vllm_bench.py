"""Balcony budgets in vLLM against vLLM's full depth, balcony's engine and HF generate, in one run.

For every budget and at batch 1 and batch B (default 16), greedy, exactly N new
tokens (EOS ignored), the same prompt of P tokens in every row:

* vLLM (each budget exported by `balcony.vllm.export_vllm`; all four engines
  loaded at once in vLLM's own environment through `balcony.vllm.worker` and
  timed in turns, so drift in a shared machine's speed hits every budget alike;
  prefix caching off so every run prefills);
* balcony's engine (`balcony.inference.engine.generate_stream`);
* HF `generate` on the base (the full budget only: HF has no budgets).

Times are medians of R runs, each timed from inside the engine so that prefill
and decode come apart within one run: time to first token (TTFT: prefill + the
first token) and decode tok/s = B * (N - 1) / (time from the first token of the
batch to its last token). vLLM reports both per request (``RequestOutput.metrics``);
balcony's engine streams its tokens; HF `generate` gets a streamer that notes when
each token arrives. The ideal
speed-up of a budget is `balcony.modeling.cost.ideal_speedup` (parameters the
full model runs per token / parameters the budget runs, LM head included).

Run it with the machine otherwise idle, under the shared benchmark lock:

    flock /work/locks/bench.lock .venv/bin/python benchmarks/vllm_bench.py --threads 1

Writes OUT/vllm_bench.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from balcony import DEFAULT_EXITS, BalconyConfig, BalconyModel, default_model, ideal_speedup, load_base
from balcony.modeling.loading import default_exit_layers
from balcony.bench.speed import make_prompt
from balcony.inference.engine import generate_stream
from balcony.vllm import export_vllm
from balcony.vllm.launch import run_worker

TRAINED = Path("runs/default")  # where `balcony train --config smollm2-default --output-dir runs/default` writes


def fixed_seed_exits(base, default: bool, directory: Path) -> Path:
    """Exits at the default layers, identity init plus seeded noise (speed does not depend on their values)."""
    layers = DEFAULT_EXITS["smollm2-135m"] if default else default_exit_layers(base.config.num_hidden_layers)
    m = BalconyModel(base, BalconyConfig(exit_layers=layers, init="identity"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.exits.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.002)
    m.save_pretrained(directory)
    return directory


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median (TTFT, decode seconds) of `repeats` calls of `fn`, which returns (t_first_token, t_end) from its start."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        first, end = fn()
        runs.append((first - t0, end - first))
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


class Clock:
    """An HF streamer that notes when the first generated token arrives (the first put() is the prompt)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exits", default=None, help="saved exits (default: runs/default if trained exits are there, else fixed-seed random exits)")
    ap.add_argument("--model", default=None, help="base path or hub id (default: the embedded SmolLM2-135M)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for every engine alike")
    ap.add_argument("--out", default="runs/vllm_bench")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    exits = Path(args.exits) if args.exits else (TRAINED if (TRAINED / "balcony_config.json").is_file() else None)
    trained = exits is not None
    base, tok = (load_base(args.model) if args.model else default_model())
    if exits is None:
        exits = fixed_seed_exits(base, args.model is None, out / "exits")
    model = BalconyModel.from_pretrained(base, exits)
    dirs = export_vllm(exits, out / "vllm", base=args.model, overwrite=True)
    one = make_prompt(tok, args.prompt_tokens)
    batch = make_prompt(tok, args.prompt_tokens, args.batch)
    n, r = args.new_tokens, args.repeats
    print(f"[vllm_bench] {len(dirs)} budgets, prompt {args.prompt_tokens} tokens, {n} new, batch 1 and {args.batch}, "
          f"{r} repeats, {args.threads} thread(s), exits {'trained: ' + str(exits) if trained else 'fixed-seed random'}", file=sys.stderr)

    # vLLM: one engine per budget; a warm-up request first, then R timed runs at each batch size.
    reqs = []
    for x in (one, batch):
        prompts = x.tolist()
        reqs += [{"prompts": prompts, "max_tokens": n, "repeats": 1}, {"prompts": prompts, "max_tokens": n, "repeats": r}]
    engine = {"dtype": "float32", "max_model_len": args.prompt_tokens + n + 8, "kv_cache_memory_bytes": 256 << 20,
              "enable_prefix_caching": False, "max_num_seqs": max(args.batch, 1), "disable_log_stats": False}
    t0 = time.perf_counter()
    vruns = run_worker({"engine": engine, "interleave": True, "runs": [{"model": str(d.path), "requests": reqs} for d in dirs]},
                       threads=args.threads, log=out / "vllm_worker.log")["runs"]
    print(f"[vllm_bench] vLLM part took {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    # balcony's engine and HF generate, in this process.
    def engine_times(x: torch.Tensor) -> dict[int, tuple[float, float]]:
        """Median (TTFT, decode s) per exit layer, the budgets timed in turns like vLLM's engines."""
        def run(j):
            t0, first = time.perf_counter(), None
            for _ in generate_stream(model, x, exit=j, max_new_tokens=n):
                first = first or time.perf_counter()
            return first - t0, time.perf_counter() - first
        layers = [d.exit_layer for d in dirs]
        for j in layers:
            run(j)  # warm-up
        runs = {j: [] for j in layers}
        for _ in range(r):
            for j in layers:
                runs[j].append(run(j))
        return {j: (statistics.median(a for a, _ in v), statistics.median(b for _, b in v)) for j, v in runs.items()}

    def hf_times(x: torch.Tensor) -> tuple[float, float]:
        from transformers import GenerationConfig

        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id or 0)

        def run():
            clock = Clock()
            with torch.no_grad():
                base.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg, streamer=clock)
            return clock.first, time.perf_counter()
        run()
        return timed(run, r)

    engine = {bsz: engine_times(one if bsz == 1 else batch) for bsz in (1, args.batch)}
    rows = []
    for d, v in zip(dirs, vruns):
        j = d.exit_layer
        row = {"budget": d.budget, "exit_layer": j, "ideal_speedup": ideal_speedup(model, d.budget)}
        for bsz, k in ((1, 1), (args.batch, 3)):
            timing = v["requests"][k]["timing"]
            row[f"vllm_b{bsz}_ttft_s"] = statistics.median(t["ttft_s"] for t in timing)
            row[f"vllm_b{bsz}_tok_s"] = bsz * (n - 1) / statistics.median(t["decode_s"] for t in timing)
            row[f"vllm_b{bsz}_wall_s"] = statistics.median(v["requests"][k]["seconds"])
            ttft, decode = engine[bsz][j]
            row[f"engine_b{bsz}_tok_s"] = bsz * (n - 1) / decode
            row[f"engine_b{bsz}_ttft_s"] = ttft
        row["vllm_startup_s"] = v["startup_s"]
        rows.append(row)
    full = rows[-1]
    for row in rows:
        for eng in ("vllm", "engine"):
            for bsz in (1, args.batch):
                s = row[f"{eng}_b{bsz}_tok_s"] / full[f"{eng}_b{bsz}_tok_s"]
                row[f"{eng}_b{bsz}_speedup"] = s
                row[f"{eng}_b{bsz}_efficiency"] = s / row["ideal_speedup"] if row["budget"] != full["budget"] else 1.0
    hf = {}
    for bsz, x in ((1, one), (args.batch, batch)):
        ttft, decode = hf_times(x)
        hf[f"b{bsz}_tok_s"], hf[f"b{bsz}_ttft_s"] = bsz * (n - 1) / decode, ttft
    result = {"args": vars(args), "exits": str(exits), "exits_trained": trained, "threads": args.threads, "rows": rows, "hf_full": hf,
              "torch": torch.__version__}
    (out / "vllm_bench.json").write_text(json.dumps(result, indent=2))
    print(table(result, args.batch))
    return 0


def table(result: dict, b: int) -> str:
    lines = [
        f"| budget | ideal | vLLM b1 tok/s | speed-up (of ideal) | vLLM b{b} tok/s | speed-up (of ideal) | vLLM TTFT b1 / b{b} | "
        f"engine b1 tok/s | speed-up | engine b{b} tok/s | speed-up | engine TTFT b1 / b{b} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        def sp(eng, bsz):
            return f"{row[f'{eng}_b{bsz}_speedup']:.2f}x ({100 * row[f'{eng}_b{bsz}_efficiency']:.0f}%)"
        lines.append(
            f"| {row['budget']} (layer {row['exit_layer']}) | {row['ideal_speedup']:.2f}x | {row['vllm_b1_tok_s']:.1f} | {sp('vllm', 1)} | "
            f"{row[f'vllm_b{b}_tok_s']:.1f} | {sp('vllm', b)} | {1000 * row['vllm_b1_ttft_s']:.0f} / {1000 * row[f'vllm_b{b}_ttft_s']:.0f} ms | "
            f"{row['engine_b1_tok_s']:.1f} | {sp('engine', 1)} | {row[f'engine_b{b}_tok_s']:.1f} | {sp('engine', b)} | "
            f"{1000 * row['engine_b1_ttft_s']:.0f} / {1000 * row[f'engine_b{b}_ttft_s']:.0f} ms |"
        )
    hf = result["hf_full"]
    lines.append(f"\nHF generate, full depth: batch 1 {hf['b1_tok_s']:.1f} tok/s (TTFT {1000 * hf['b1_ttft_s']:.0f} ms), "
                 f"batch {b} {hf[f'b{b}_tok_s']:.1f} tok/s (TTFT {1000 * hf[f'b{b}_ttft_s']:.0f} ms)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
