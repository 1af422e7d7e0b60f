"""`balcony bench`: decode and prefill speed at every budget, against HF `generate`.

One run, warm-up excluded, measures for one model:

* the engine's decode tok/s (batch 1) and prefill tok/s at every budget, the
  speed-up over the full model, the ideal speed-up (compute of the full model /
  compute of the budget, counting decoder layers, the exit layer, the final norm
  and the LM head; the embedding lookup is free) and the efficiency
  (measured / ideal);
* HF `generate` (greedy) on the same base model at batch 1 and batch B, and the
  engine at batch B;
* self-speculative decoding at each exit below the full model (acceptance rate,
  tokens per verify pass, tok/s, speed-up over full-depth decoding), beside HF's
  own self-speculative decoding (LayerSkip-style ``assistant_early_exit=j``,
  which drafts with the base's final norm + head at layer j, not a Balcony exit);
* peak memory of each: the growth of the process's resident set (RSS) over its
  level before the run, sampled every millisecond by a thread during the
  (untimed) warm-up run of that configuration. tracemalloc does not see torch's
  CPU allocations; RSS does, but it also counts allocator caching, so read it
  as an upper bound on what the run allocated. The engine's KV-cache bytes are
  reported exactly beside it;
* with ``quantize`` (``--quantize int8``/``int4``): a weight-quantized copy of the
  model (`balcony.quantize`) decoding at full depth through the engine and
  through HF `generate` (the same quantized module tree, a same-model
  comparison), beside the float rows, and its quality: the fraction of the
  bench's greedy tokens identical to the float model's, the length of the
  identical prefix, and the mean KL(float || quantized) of the next-token
  distributions over the prompt.

Timings are the median of `repeats` runs, taken round-robin over all cases (see
`run_cases`). Every decode runs exactly `max_new_tokens` tokens (EOS ignored),
greedy, so all rows do the same work; decode rates exclude prefill and the
first token.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from .cli import command
from .model import BalconyModel

PROMPT_TEXT = (
    "The history of astronomy is the story of people looking up at the night sky and trying to explain what they "
    "saw. Early observers tracked the motion of the Sun, the Moon and the planets, built calendars around them and "
    "predicted eclipses. Later, telescopes revealed moons around Jupiter, the phases of Venus and countless stars "
    "invisible to the naked eye, and physics explained why the planets move as they do. "
)


# ----------------------------------------------------------------------------- measuring
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


def _wall(fn: Callable[[], object]) -> Callable[[], float]:
    """`fn` -> a function returning its wall time in seconds."""

    def timed() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return timed


def run_cases(cases: dict[str, Callable[[], object]], repeats: int, log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Warm up every case once (measuring its peak RSS growth), then run them round-robin `repeats` times.

    Round-robin rather than case after case: on a shared machine the load
    drifts, and interleaving spreads the drift over every case alike.
    Each case times itself and returns what it measured.

    Returns:
        (case -> list of its `repeats` results, case -> peak RSS growth in MiB).
    """
    memory = {}
    for name, fn in cases.items():
        with PeakRSS() as mem:
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
    from .quantize import QUANTIZED

    kinds = (torch.nn.Linear, *QUANTIZED)
    linears = [mod for layer in model.parts.layers for mod in layer.modules() if isinstance(mod, kinds)]
    linears.append(model.parts.lm_head)
    x = {}
    emb = model.parts.embed_tokens.weight
    with torch.no_grad():
        for mod in linears:  # inputs of the right width, made outside the timed loop
            x.setdefault(mod.in_features, torch.randn(1, 1, mod.in_features, dtype=emb.dtype, device=emb.device))
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            for mod in linears:
                if type(mod) is torch.nn.Linear:
                    torch.nn.functional.linear(x[mod.in_features], mod.weight, mod.bias)
                else:  # a quantized layer: its kernel and casts
                    mod(x[mod.in_features])
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def ideal_speedup(model: BalconyModel, exit) -> float:
    """Compute of the full model / compute of a budget: decoder layers + exit layer + norm + LM head."""
    head = model.parts.lm_head.weight.numel()
    return (model.count_parameters(None) + head) / (model.count_parameters(exit) + head)


def make_prompt(tokenizer, n_tokens: int, batch_size: int = 1) -> torch.Tensor:
    """(batch_size, n_tokens) ids of a fixed English text (repeated as needed)."""
    ids = tokenizer(PROMPT_TEXT * (1 + n_tokens // 40), return_tensors="pt", add_special_tokens=False).input_ids[:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"prompt_tokens={n_tokens} is longer than the benchmark text ({ids.shape[1]} tokens)")
    return ids.repeat(batch_size, 1)


# ----------------------------------------------------------------------------- the benchmark
def run_bench(
    model: BalconyModel,
    tokenizer,
    *,
    max_new_tokens: int = 64,
    prompt_tokens: int = 64,
    repeats: int = 3,
    draft_length: int = 4,
    draft_threshold: float | None = None,
    draft_vocab: int | None = None,
    draft_width: int = 1,
    batch_size: int = 8,
    hf: bool = True,
    speculative: bool = True,
    quantize: str | None = None,
    compile: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure everything `balcony bench` reports; returns a JSON-ready dict.

    Args:
        model: The Balcony model (its base is the HF baseline).
        tokenizer: Its tokenizer (for the prompt).
        max_new_tokens: Tokens decoded per run (>= 2).
        prompt_tokens: Prompt length.
        repeats: Timed runs per configuration (median reported); one more warm-up run is not timed.
        draft_length: Tokens drafted per verify pass, for ours and HF's speculative decoding.
        draft_threshold: Our drafts stop early below this exit top-1 probability (None: fixed length).
        draft_vocab: Our drafts choose among the first this many token ids (None: all).
        draft_width: Candidates our drafts propose for one position (> 1: a tree of depth 1, draft_length 1).
        batch_size: The batched HF `generate` (and engine) comparison.
        hf: Include HF `generate` baselines.
        speculative: Include self-speculative decoding.
        quantize: Also time (and score) a copy of the model quantized this way ("int8", "int4"; None: no).
        compile: Also time full-depth decoding with the decode step through `torch.compile` (inductor),
            float and quantized; the compile time (first run) is reported apart.
        log: Progress printer.
    """
    from transformers import GenerationConfig

    from .engine import generate_stream
    from .speculative import SpeculativeStats, speculative_stream

    if max_new_tokens < 2:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 2 to time decoding apart from prefill")
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    qmodel = None
    if quantize:
        import copy

        from .quantize import quantize_model

        qmodel = copy.deepcopy(model)
        quantize_model(qmodel, quantize)
    base = model.base
    n = model.num_layers
    ids = make_prompt(tokenizer, prompt_tokens)
    xb = make_prompt(tokenizer, prompt_tokens, batch_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    small = {name: j for name, j in model.budgets.items() if j < n}

    # Every case times itself. Decode rates exclude prefill and the first token, for every row alike:
    # the engine and speculative decoding are timed from their first streamed token; HF generate
    # (no stream) as t(max_new_tokens) - t(1 token).
    def engine_run(exit: int, x: torch.Tensor, m: BalconyModel = model, compiled: bool = False) -> tuple[float, float]:
        t0 = time.perf_counter()
        first = None
        for _ in generate_stream(m, x, exit=exit, max_new_tokens=max_new_tokens, compile=compiled):
            if first is None:
                first = time.perf_counter()
        return first - t0, time.perf_counter() - first

    def spec_run(j: int) -> tuple[float, SpeculativeStats]:
        stats = SpeculativeStats(j, draft_length)
        first = None
        for _ in speculative_stream(
            model, ids, exit=j, draft_length=draft_length, draft_threshold=draft_threshold, draft_vocab=draft_vocab,
            draft_width=draft_width, max_new_tokens=max_new_tokens, stats=stats,
        ):
            if first is None:
                first = time.perf_counter()
        return time.perf_counter() - first, stats

    def hf_run(x: torch.Tensor, new_tokens: int, hf_base: torch.nn.Module = base, **extra) -> Callable[[], float]:
        cfg = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad, **extra)
        mask = torch.ones_like(x)

        def run() -> None:
            with torch.no_grad():
                hf_base.generate(x, attention_mask=mask, generation_config=cfg)

        return _wall(run)

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
                cases[f"layerskip:{j}"] = hf_run(ids, max_new_tokens, assistant_early_exit=j, num_assistant_tokens=draft_length)

    # Touch every weight once first: weights loaded lazily (mmap) would otherwise count as the first case's memory.
    engine_run(n, ids)
    for j in model.exit_layers:
        engine_run(j, ids[:, :2])
    if qmodel is not None:
        engine_run(n, ids, qmodel)
    compile_s = {}
    if compile:
        for key, m in (("engine_c", model), ("engine_qc", qmodel)):
            if m is not None:
                t0 = time.perf_counter()
                engine_run(n, ids, m, True)  # compiles (and recompiles once for the growing cache)
                compile_s[key] = time.perf_counter() - t0
                cases[key] = lambda m=m: engine_run(n, ids, m, True)
    floor = matmul_floor_s(model)
    log(f"[bench] weight matmuls alone (full depth): {1 / floor:.1f} tok/s; running {len(cases)} cases x {repeats} rounds")
    runs, memory = run_cases(cases, repeats, log)
    med = statistics.median

    result: dict = {
        "model": model.config.base_model_name_or_path,
        "dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "max_new_tokens": max_new_tokens,
        "prompt_tokens": prompt_tokens,
        "repeats": repeats,
        "draft_length": draft_length,
        "draft_threshold": draft_threshold,
        "draft_vocab": draft_vocab,
        "draft_width": draft_width,
        "batch_size": batch_size,
        "exit_layers": model.exit_layers,
        "matmul_floor_tok_s": 1 / floor,
        "budgets": [],
        "hf": {},
        "speculative": [],
        "memory_note": (
            "peak RSS growth (MiB) over the level before the run, during the untimed warm-up run, sampled every 1 ms "
            "after returning freed heap memory to the OS (malloc_trim); weights are touched beforehand"
        ),
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
                "kv_cache_mb": _kv_mb(model, j, 1, prompt_tokens + max_new_tokens),
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
        result["compiled"] = {
            key: {
                "decode_tok_s": (max_new_tokens - 1) / med(x[1] for x in runs[key]),
                "first_run_s": compile_s[key],
                "peak_rss_mb": memory[key],
            }
            for key in compile_s
        }
        result["compiled"]["engine_c"]["over_eager"] = result["compiled"]["engine_c"]["decode_tok_s"] / full_rate
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
    from .engine import generate
    from .quantize import QUANTIZED

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


def _kv_mb(model: BalconyModel, j: int, batch: int, length: int) -> float:
    """Exact KV-cache size of a budget: layers 1..j (+ the exit's layer) x 2 x B x H_kv x L x D x bytes."""
    from .engine import budget_slots

    cfg = model.base.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    itemsize = next(model.base.parameters()).element_size()
    return len(budget_slots(model, j)) * 2 * batch * kv_heads * length * head_dim * itemsize / 2**20


# ----------------------------------------------------------------------------- reporting
def format_table(result: dict) -> str:
    """The human-readable tables of a `run_bench` result."""
    lines = [
        f"model {result['model']} ({result['dtype']}, {result['threads']} threads); prompt {result['prompt_tokens']} tokens, "
        f"{result['max_new_tokens']} new tokens, median of {result['repeats']} runs",
        "",
        f"{'budget':<7}{'layer':>6}{'decode tok/s':>14}{'prefill tok/s':>15}{'speed-up':>10}{'ideal':>8}{'efficiency':>12}{'KV MiB':>8}{'peak MiB':>10}",
    ]
    for r in result["budgets"]:
        lines.append(
            f"{r['budget']:<7}{r['exit_layer']:>6}{r['decode_tok_s']:>14.1f}{r['prefill_tok_s']:>15.0f}{r['speedup']:>9.2f}x"
            f"{r['ideal_speedup']:>7.2f}x{r['efficiency']:>11.0%}{r['kv_cache_mb']:>8.2f}{r['peak_rss_mb']:>10.1f}"
        )
    if result["hf"]:
        lines += ["", f"{'baseline (full model, greedy)':<36}{'decode tok/s':>14}{'peak MiB':>10}"]
        for key, r in result["hf"].items():
            label = {"batch1": "HF generate, batch 1"}.get(key) or (
                f"engine, batch {key[len('engine_batch'):]}" if key.startswith("engine") else f"HF generate, batch {key[len('batch'):]}"
            )
            lines.append(f"{label:<36}{r['decode_tok_s']:>14.1f}{r['peak_rss_mb']:>10.1f}")
        lines.append(f"engine full depth / HF generate at batch 1: {result['engine_over_hf_batch1']:.2f}x")
    if "matmul_floor_tok_s" in result:
        full = result["budgets"][-1]["decode_tok_s"]
        lines.append(
            f"weight matmuls alone (full depth, batch 1): {result['matmul_floor_tok_s']:.1f} tok/s; "
            f"the engine runs at {full / result['matmul_floor_tok_s']:.0%} of that floor"
        )
    q = result.get("quantized")
    if q:
        full = result["budgets"][-1]["decode_tok_s"]
        lines += ["", f"weight-only {q['mode']} (full depth, batch 1){'':<6}{'decode tok/s':>14}{'peak MiB':>10}"]
        if "hf_decode_tok_s" in q:
            lines.append(f"{'HF generate, float':<36}{result['hf']['batch1']['decode_tok_s']:>14.1f}{result['hf']['batch1']['peak_rss_mb']:>10.1f}")
        lines.append(f"{'engine, float':<36}{full:>14.1f}{result['budgets'][-1]['peak_rss_mb']:>10.1f}")
        lines.append(f"{'engine, ' + q['mode']:<36}{q['engine_decode_tok_s']:>14.1f}{q['engine_peak_rss_mb']:>10.1f}")
        if "hf_decode_tok_s" in q:
            lines.append(f"{'HF generate, ' + q['mode'] + ' (same modules)':<36}{q['hf_decode_tok_s']:>14.1f}{q['hf_peak_rss_mb']:>10.1f}")
            lines.append(
                f"engine {q['mode']} / HF generate float: {q['engine_over_hf_float']:.2f}x; "
                f"/ HF generate {q['mode']}: {q['engine_over_hf_quantized']:.2f}x; / engine float: {q['over_engine_float']:.2f}x"
            )
        else:
            lines.append(f"engine {q['mode']} / engine float: {q['over_engine_float']:.2f}x")
        lines.append(
            f"{q['mode']} linear weights {q['linear_weights_mb']:.1f} MiB, matmuls alone {q['matmul_floor_tok_s']:.1f} tok/s; "
            f"quality: {q['greedy_match']:.0%} of {q['greedy_tokens']} greedy tokens identical to float "
            f"(first {q['greedy_identical_prefix']} in a row), mean KL(float || {q['mode']}) over the prompt {q['kl_float_quantized']:.4f} nats"
        )
    for key, c in result.get("compiled", {}).items():
        label = "float" if key == "engine_c" else result["quantized"]["mode"]
        line = (
            f"engine, {label}, torch.compile (inductor): {c['decode_tok_s']:.1f} tok/s, {c['over_eager']:.2f}x eager "
            f"(first run, compiling: {c['first_run_s']:.0f} s)"
        )
        if "over_hf_float" in c:
            line += f"; {c['over_hf_float']:.2f}x HF generate float"
        lines += ([""] if key == "engine_c" else []) + [line]
    if result["speculative"]:
        lines += [
            "",
            f"self-speculative, draft length {result['draft_length']}"
            + (f", drafts stop below top-1 p {result['draft_threshold']}" if result.get("draft_threshold") is not None else "")
            + (f", drafts among the first {result['draft_vocab']} token ids" if result.get("draft_vocab") else "")
            + (f", {result['draft_width']} candidates per drafted position" if result.get("draft_width", 1) > 1 else "")
            + " (output = full model's)",
            f"{'draft':<7}{'layer':>6}{'accept':>8}{'tok/pass':>10}{'passes':>8}{'tok/s':>8}{'vs full':>9}{'peak MiB':>10}"
            + (f"{'HF LayerSkip tok/s':>20}{'ours / LayerSkip':>18}" if "hf_layerskip_tok_s" in result["speculative"][0] else ""),
        ]
        for r in result["speculative"]:
            line = (
                f"{r['budget']:<7}{r['exit_layer']:>6}{r['acceptance_rate']:>8.0%}{r['mean_accepted_length']:>10.2f}"
                f"{r['verify_passes']:>8}{r['decode_tok_s']:>8.1f}{r['speedup']:>8.2f}x{r['peak_rss_mb']:>10.1f}"
            )
            if "hf_layerskip_tok_s" in r:
                line += f"{r['hf_layerskip_tok_s']:>20.1f}{r['decode_tok_s'] / r['hf_layerskip_tok_s']:>17.2f}x"
            lines.append(line)
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    """Bar chart of decode tok/s: budgets (with the ideal), speculative, HF. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    full = result["budgets"][-1]["decode_tok_s"]
    labels, values, ideal, colors = [], [], [], []
    for r in result["budgets"]:
        labels.append(f"{r['budget']}\n(L{r['exit_layer']})")
        values.append(r["decode_tok_s"])
        ideal.append(full * r["ideal_speedup"])
        colors.append("tab:blue")
    for r in result["speculative"]:
        labels.append(f"spec {r['budget']}")
        values.append(r["decode_tok_s"])
        ideal.append(None)
        colors.append("tab:green")
        if "hf_layerskip_tok_s" in r:
            labels.append(f"HF skip\nL{r['exit_layer']}")
            values.append(r["hf_layerskip_tok_s"])
            ideal.append(None)
            colors.append("tab:gray")
    for key, r in result["hf"].items():
        if key == "batch1":
            labels.append("HF gen\nB=1")
            values.append(r["decode_tok_s"])
            ideal.append(None)
            colors.append("tab:red")
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(labels)), 4))
    xs = range(len(labels))
    ax.bar(xs, values, color=colors)
    for x, v in zip(xs, ideal):
        if v is not None:
            ax.hlines(v, x - 0.4, x + 0.4, colors="black", linestyles="dashed")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(f"{result['model']}: decode speed (dashed: ideal from compute)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


@command
def bench(
    model: str | None = None,
    exits: str | None = None,
    exit_layers: list[int] | None = None,
    exit_kind: str = "decoder",
    max_new_tokens: int = 64,
    prompt_tokens: int = 64,
    repeats: int = 3,
    draft_length: int = 1,
    draft_threshold: float | None = 0.4,
    draft_vocab: int | None = 8192,
    draft_width: int = 1,
    batch_size: int = 8,
    threads: int = 0,
    out: str = "runs/bench",
    hf: bool = True,
    speculative: bool = True,
    quantize: str | None = None,
    compile: bool = False,
) -> int:
    """Benchmark decoding: tok/s per budget vs ideal, HF generate, self-speculative decoding, memory.

    Args:
        model: Base model: hub id or local path (default: the embedded SmolLM2-135M-Instruct).
        exits: Directory (or hub id) of trained exits; without it, fresh untrained exits are attached.
        exit_layers: Exit layers for fresh exits (default: 14,17,20 on the embedded model).
        exit_kind: Kind of fresh exits (decoder, mlp, attention, norm).
        max_new_tokens: Tokens decoded per run (a CI-sized run: 8).
        prompt_tokens: Prompt length in tokens.
        repeats: Timed runs per configuration (median); a warm-up run is not timed.
        draft_length: Tokens drafted per verify pass (ours and HF's). The defaults (1 token, threshold 0.4,
            8192-token draft vocabulary) were the fastest measured with the trained SmolLM2 exits.
        draft_threshold: Stop our drafts early below this exit top-1 probability (Kangaroo-style; 0: never).
        draft_vocab: Our drafts choose among the first this many token ids (a cheaper draft head; 0: all).
        draft_width: Candidates our drafts propose for one position (> 1: verified side by side; needs draft length 1).
        batch_size: Batch size of the batched HF generate comparison.
        threads: torch CPU threads (0: torch's default).
        out: Directory for bench.json and bench.png.
        hf: Include HF generate baselines.
        speculative: Include self-speculative decoding.
        quantize: Also run a weight-quantized copy (int8, int4) at full depth, through the engine and HF generate, with its quality.
        compile: Also time full-depth decoding through torch.compile (inductor; compiling takes a minute or more on CPU).
    """
    from transformers.utils import logging as hf_logging

    from .commands import build_model

    hf_logging.set_verbosity_error()  # assisted generation warns about its own internal arguments
    if quantize:
        from .quantize import parse_mode

        parse_mode(quantize)  # a bad mode fails before the model loads
    if threads:
        torch.set_num_threads(threads)
    m, tok, trained = build_model(model, exits, exit_layers, exit_kind)
    print(f"[bench] exits {'trained' if trained else 'UNTRAINED (initialised from the last layer): speculative acceptance is low'}", file=sys.stderr)
    result = run_bench(
        m, tok, max_new_tokens=max_new_tokens, prompt_tokens=prompt_tokens, repeats=repeats, draft_length=draft_length,
        draft_threshold=draft_threshold if draft_threshold and draft_threshold > 0 else None, draft_vocab=draft_vocab or None,
        draft_width=draft_width, batch_size=batch_size, hf=hf, speculative=speculative, quantize=quantize, compile=compile, log=lambda s: print(s, file=sys.stderr),
    )
    result["exits_trained"] = trained
    print(format_table(result))
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench.json").write_text(json.dumps(result, indent=2))
    drawn = plot(result, directory / "bench.png")
    print(f"\nwrote {directory / 'bench.json'}" + (f" and {directory / 'bench.png'}" if drawn else " (no chart: matplotlib is not installed)"))
    return 0
