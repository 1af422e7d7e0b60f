"""`balcony bench` output: the text table and the speed chart."""

from __future__ import annotations

from pathlib import Path


def format_table(result: dict) -> str:
    """The human-readable tables of a `run_bench` result."""
    compiled = "compiled_decode_tok_s" in result["budgets"][0]
    lines = [
        f"model {result['model']} ({result['dtype']}, {result.get('device', 'cpu')}, {result['threads']} threads); "
        f"prompt {result['prompt_tokens']} tokens, {result['max_new_tokens']} new tokens, median of {result['repeats']} runs",
        "",
        f"{'budget':<7}{'layer':>6}{'decode tok/s':>14}{'prefill tok/s':>15}{'speed-up':>10}{'ideal':>8}{'efficiency':>12}{'KV MiB':>8}{'peak MiB':>10}"
        + (f"{'compiled tok/s':>16}{'vs eager':>10}" if compiled else ""),
    ]
    for r in result["budgets"]:
        lines.append(
            f"{r['budget']:<7}{r['exit_layer']:>6}{r['decode_tok_s']:>14.1f}{r['prefill_tok_s']:>15.0f}{r['speedup']:>9.2f}x"
            f"{r['ideal_speedup']:>7.2f}x{r['efficiency']:>11.0%}{r['kv_cache_mb']:>8.2f}{r['peak_rss_mb']:>10.1f}"
            + (f"{r['compiled_decode_tok_s']:>16.1f}{r['compiled_over_eager']:>9.2f}x" if compiled else "")
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
    for key in ("engine_c", "engine_qc"):
        c = result.get("compiled", {}).get(key)
        if c is None:
            continue
        label = "float" if key == "engine_c" else result["quantized"]["mode"]
        line = (
            f"engine, {label}, full depth, torch.compile ({result.get('compile_backend', 'inductor')}): "
            f"{c['decode_tok_s']:.1f} tok/s, {c['over_eager']:.2f}x eager (first run, compiling: {c['first_run_s']:.0f} s)"
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
