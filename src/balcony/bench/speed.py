"""`balcony bench`: decode and prefill speed at every budget, against HF `generate`, in one run.

One run, warm-up excluded, measures for one model:

* the engine's decode tok/s (batch 1) and prefill tok/s at every budget, the
  speed-up over the full model, the ideal speed-up (`balcony.modeling.cost`)
  and the efficiency (measured / ideal);
* HF `generate` (greedy) on the same base model at batch 1 and batch B, and the
  engine at batch B;
* self-speculative decoding at each exit below the full model, beside HF's own
  self-speculative decoding (LayerSkip-style ``assistant_early_exit=j``, which
  drafts with the base's final norm + head at layer j, not a Balcony exit);
* peak memory of each (`balcony.bench.measure.peak_memory`: RSS on the CPU,
  the allocator's peak on CUDA), and the KV-cache bytes;
* with ``quantize``: a weight-quantized copy decoding at full depth through the
  engine and HF `generate`, and its quality against the float model;
* with ``compile``: every budget again with its decode step through
  `torch.compile` (CUDA graphs on CUDA), beside the eager rate.

Timings are the median of `repeats` runs, taken round-robin over all cases. Every
decode runs exactly `max_new_tokens` tokens (EOS ignored), greedy, so all rows do
the same work; decode rates exclude prefill and the first token. The model runs
where it is (`model.to("cuda")` before the call: the prompts follow it), and every
clock read waits for the device first (`balcony.bench.measure.now`).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Callable

import torch

from ..inference.devices import execution_device
from ..inference.options import DraftOptions
from ..modeling.cost import ideal_speedup, kv_cache_bytes
from ..modeling.model import BalconyModel
from .measure import _wall, matmul_floor_s, memory_kind, now, run_cases

PROMPT_TEXT = (
    "The history of astronomy is the story of people looking up at the night sky and trying to explain what they "
    "saw. Early observers tracked the motion of the Sun, the Moon and the planets, built calendars around them and "
    "predicted eclipses. Later, telescopes revealed moons around Jupiter, the phases of Venus and countless stars "
    "invisible to the naked eye, and physics explained why the planets move as they do. "
)


def make_prompt(tokenizer, n_tokens: int, batch_size: int = 1) -> torch.Tensor:
    """(batch_size, n_tokens) ids of a fixed English text (repeated as needed)."""
    ids = tokenizer(PROMPT_TEXT * (1 + n_tokens // 40), return_tensors="pt", add_special_tokens=False).input_ids[:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"prompt_tokens={n_tokens} is longer than the benchmark text ({ids.shape[1]} tokens)")
    return ids.repeat(batch_size, 1)


def run_bench(
    model: BalconyModel,
    tokenizer,
    *,
    max_new_tokens: int = 64,
    prompt_tokens: int = 64,
    repeats: int = 3,
    draft: DraftOptions | None = None,
    batch_size: int = 8,
    hf: bool = True,
    speculative: bool = True,
    quantize: str | None = None,
    compile: bool | str = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure everything `balcony bench` reports; returns a JSON-ready dict.

    Args:
        model: The Balcony model (its base is the HF baseline).
        tokenizer: Its tokenizer (for the prompt).
        max_new_tokens: Tokens decoded per run (>= 2).
        prompt_tokens: Prompt length.
        repeats: Timed runs per configuration (median reported); one more warm-up run is not timed.
        draft: How our self-speculative decoding drafts (`DraftOptions`); its `draft_length` is HF's too.
        batch_size: The batched HF `generate` (and engine) comparison.
        hf: Include HF `generate` baselines.
        speculative: Include self-speculative decoding.
        quantize: Also time (and score) a copy of the model quantized this way ("int8", "int4"; None: no).
        compile: Also time every budget (and the quantized copy at full depth) with the decode step through
            `torch.compile` (True: inductor, or a backend name); the compile time (first run) is reported apart.
        log: Progress printer.
    """
    from transformers import GenerationConfig

    from ..inference.engine import generate_stream
    from ..inference.speculative import SpeculativeStats, speculative_stream

    draft = draft or DraftOptions()
    if max_new_tokens < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 2 to time decoding apart from prefill")
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    qmodel = None
    if quantize:
        import copy

        from ..inference.quantize import quantize_model

        qmodel = copy.deepcopy(model)
        quantize_model(qmodel, quantize)
    base = model.base
    n = model.num_layers
    device = execution_device(model)
    ids = make_prompt(tokenizer, prompt_tokens).to(device)
    xb = make_prompt(tokenizer, prompt_tokens, batch_size).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    small = {name: j for name, j in model.budgets.items() if j < n}

    # Every case times itself. Decode rates exclude prefill and the first token, for every row alike:
    # the engine and speculative decoding are timed from their first streamed token; HF generate
    # (no stream) as t(max_new_tokens) - t(1 token).
    def engine_run(exit: int, x: torch.Tensor, m: BalconyModel = model, compiled: bool | str = False) -> tuple[float, float]:
        t0 = now(device)
        first = None
        for _ in generate_stream(m, x, exit=exit, max_new_tokens=max_new_tokens, compile=compiled):
            if first is None:
                first = now(device)
        return first - t0, now(device) - first

    def spec_run(j: int) -> tuple[float, SpeculativeStats]:
        stats = SpeculativeStats(j, draft.draft_length)
        first = None
        for _ in speculative_stream(
            model, ids, exit=j, draft=draft, max_new_tokens=max_new_tokens, stats=stats,
        ):
            if first is None:
                first = now(device)
        return now(device) - first, stats

    def hf_run(x: torch.Tensor, new_tokens: int, hf_base: torch.nn.Module = base, **extra) -> Callable[[], float]:
        cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad, **extra)
        mask = torch.ones_like(x)

        def run() -> None:
            with torch.no_grad():
                hf_base.generate(x, attention_mask=mask, generation_config=cfg)

        return _wall(run, device)

    cases: dict[str, Callable[[], object]] = {}
    for name, j in model.budgets.items():
        cases[f"engine:{j}"] = lambda j=j: engine_run(j, ids)
    if hf:
        cases["hf:1:first"] = hf_run(ids, 1)
        cases["hf:1"] = hf_run(ids, max_new_tokens)
        cases["hf:B:first"] = hf_run(xb, 1)
        cases["hf:B"] = hf_run(xb, max_new_tokens)
        cases["engine:B"] = lambda: engine_run(n, xb)
    if qmodel is not None:
        cases["engine_q"] = lambda: engine_run(n, ids, qmodel)
        if hf:
            cases["hf_q:1:first"] = hf_run(ids, 1, qmodel.base)
            cases["hf_q:1"] = hf_run(ids, max_new_tokens, qmodel.base)
    if speculative:
        for name, j in small.items():
            cases[f"spec:{j}"] = lambda j=j: spec_run(j)
            if hf:
                cases[f"layerskip:{j}"] = hf_run(ids, max_new_tokens, assistant_early_exit=j, num_assistant_tokens=draft.draft_length)

    # Touch every weight once first: weights loaded lazily (mmap) would otherwise count as the first case's memory.
    engine_run(n, ids)
    for j in model.exit_layers:
        engine_run(j, ids[:, :2])
    if qmodel is not None:
        engine_run(n, ids, qmodel)
    compile_s = {}
    if compile:
        compiled_runs = [(f"engine_c:{j}", model, j) for j in model.budgets.values()]
        compiled_runs += [("engine_qc", qmodel, n)] if qmodel is not None else []
        for key, m, j in compiled_runs:
            t0 = now(device)
            engine_run(j, ids, m, compile)  # traces and compiles this budget's step (once: its shapes never change)
            compile_s[key] = now(device) - t0
            cases[key] = lambda m=m, j=j: engine_run(j, ids, m, compile)
            log(f"[bench] compiled {key} in {compile_s[key]:.0f} s")
    floor = matmul_floor_s(model)
    log(f"[bench] weight matmuls alone (full depth): {1 / floor:.1f} tok/s; running {len(cases)} cases x {repeats} rounds")
    runs, memory = run_cases(cases, repeats, log, device)
    med = statistics.median

    result: dict = {
        "model": model.config.base_model_name_or_path,
        "dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "max_new_tokens": max_new_tokens,
        "prompt_tokens": prompt_tokens,
        "repeats": repeats,
        **dataclasses.asdict(draft),
        "batch_size": batch_size,
        "exit_layers": model.exit_layers,
        "matmul_floor_tok_s": 1 / floor,
        "budgets": [],
        "hf": {},
        "speculative": [],
        "device": str(device),
        "memory_note": memory_kind(device),
    }
    rows = result["budgets"]
    for name, j in model.budgets.items():
        r = runs[f"engine:{j}"]
        rows.append(
            {
                "budget": name,
                "exit_layer": j,
                "decode_tok_s": (max_new_tokens - 1) / med(x[1] for x in r),
                "prefill_tok_s": prompt_tokens / med(x[0] for x in r),
                "ideal_speedup": ideal_speedup(model, j),
                "peak_rss_mb": memory[f"engine:{j}"],
                "kv_cache_mb": kv_cache_bytes(model, j, 1, prompt_tokens + max_new_tokens) / 2**20,
            }
        )
    full_rate = rows[-1]["decode_tok_s"]
    for r in rows:
        r["speedup"] = r["decode_tok_s"] / full_rate
        r["efficiency"] = r["speedup"] / r["ideal_speedup"]

    if hf:
        hf_first = med(runs["hf:1:first"])
        result["hf"]["batch1"] = {"decode_tok_s": (max_new_tokens - 1) / (med(runs["hf:1"]) - hf_first), "peak_rss_mb": memory["hf:1"]}
        result["hf"][f"batch{batch_size}"] = {
            "decode_tok_s": batch_size * (max_new_tokens - 1) / (med(runs["hf:B"]) - med(runs["hf:B:first"])),
            "peak_rss_mb": memory["hf:B"],
        }
        result["hf"][f"engine_batch{batch_size}"] = {
            "decode_tok_s": batch_size * (max_new_tokens - 1) / med(x[1] for x in runs["engine:B"]),
            "peak_rss_mb": memory["engine:B"],
        }
        result["engine_over_hf_batch1"] = full_rate / result["hf"]["batch1"]["decode_tok_s"]

    if compile_s:
        result["compile_backend"] = "inductor" if compile is True else str(compile)
        result["compiled"] = {
            key: {
                "decode_tok_s": (max_new_tokens - 1) / med(x[1] for x in runs[key]),
                "first_run_s": compile_s[key],
                "peak_rss_mb": memory[key],
            }
            for key in compile_s
        }
        for r in rows:  # every budget, compiled beside eager
            c = result["compiled"][f"engine_c:{r['exit_layer']}"]
            c["over_eager"] = c["decode_tok_s"] / r["decode_tok_s"]
            r["compiled_decode_tok_s"], r["compiled_over_eager"] = c["decode_tok_s"], c["over_eager"]
        result["compiled"]["engine_c"] = result["compiled"][f"engine_c:{n}"]  # full depth, under its old name
    if qmodel is not None:
        result["quantized"] = quantized_row(
            model, qmodel, quantize, ids, max_new_tokens, runs, memory, full_rate, result["hf"].get("batch1")
        )
        if "engine_qc" in compile_s:
            qc = result["compiled"]["engine_qc"]
            qc["over_eager"] = qc["decode_tok_s"] / result["quantized"]["engine_decode_tok_s"]
            if hf:
                qc["over_hf_float"] = qc["decode_tok_s"] / result["hf"]["batch1"]["decode_tok_s"]

    if speculative:
        for name, j in small.items():
            r = runs[f"spec:{j}"]
            stats = r[-1][1]
            rate = (max_new_tokens - 1) / med(x[0] for x in r)
            row = {
                "budget": name,
                "exit_layer": j,
                "acceptance_rate": stats.acceptance_rate,
                "mean_accepted_length": stats.mean_accepted_length,
                "verify_passes": stats.rounds,
                "decode_tok_s": rate,
                "speedup": rate / full_rate,
                "peak_rss_mb": memory[f"spec:{j}"],
            }
            if hf:
                hf_rate = (max_new_tokens - 1) / (med(runs[f"layerskip:{j}"]) - hf_first)
                row["hf_layerskip_tok_s"] = hf_rate
                row["hf_layerskip_speedup"] = hf_rate / result["hf"]["batch1"]["decode_tok_s"]
                row["hf_layerskip_peak_rss_mb"] = memory[f"layerskip:{j}"]
            result["speculative"].append(row)
    return result


def quantized_row(
    model: BalconyModel,
    qmodel: BalconyModel,
    mode: str,
    ids: torch.Tensor,
    max_new_tokens: int,
    runs: dict,
    memory: dict,
    full_rate: float,
    hf_float: dict | None,
) -> dict:
    """Speed and quality of the quantized copy: engine and HF tok/s, ratios, greedy agreement, KL on the prompt."""
    from ..inference.engine import generate
    from ..inference.quantize import QUANTIZED

    med = statistics.median
    rate = (max_new_tokens - 1) / med(x[1] for x in runs["engine_q"])
    with torch.no_grad():
        ref = generate(model, ids, max_new_tokens=max_new_tokens)[0, ids.shape[1] :]
        out = generate(qmodel, ids, max_new_tokens=max_new_tokens)[0, ids.shape[1] :]
        logp = model(ids).logits[0].float().log_softmax(-1)  # (T, V) next-token distributions over the prompt
        logq = qmodel(ids).logits[0].float().log_softmax(-1)
    same = ref == out
    weights = sum(
        sum(t.nbytes for t in mod.parameters(recurse=False)) + sum(t.nbytes for t in mod.buffers(recurse=False))
        for mod in qmodel.modules()
        if isinstance(mod, (torch.nn.Linear, *QUANTIZED))
    )
    row = {
        "mode": mode,
        "engine_decode_tok_s": rate,
        "engine_peak_rss_mb": memory["engine_q"],
        "over_engine_float": rate / full_rate,
        "matmul_floor_tok_s": 1 / matmul_floor_s(qmodel),
        "linear_weights_mb": weights / 2**20,
        "greedy_match": float(same.float().mean()),
        "greedy_identical_prefix": int(same.long().cumprod(0).sum()),
        "greedy_tokens": int(same.numel()),
        "kl_float_quantized": float((logp.exp() * (logp - logq)).sum(-1).mean()),
    }
    if hf_float is not None:
        hf_q = (max_new_tokens - 1) / (med(runs["hf_q:1"]) - med(runs["hf_q:1:first"]))
        row.update(
            hf_decode_tok_s=hf_q,
            hf_peak_rss_mb=memory["hf_q:1"],
            engine_over_hf_float=rate / hf_float["decode_tok_s"],
            engine_over_hf_quantized=rate / hf_q,
        )
    return row
