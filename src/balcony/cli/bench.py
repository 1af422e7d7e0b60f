"""`balcony bench`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..bench.report import format_table, plot
from ..bench.speed import run_bench
from ..bench.token_exits import format_token_exit_bench, run_token_exit_bench
from ..eval.texts import load_texts
from ..eval.texts import text_windows as split_windows
from ..inference.options import DraftOptions, ExitPolicy
from ..inference.quantize import parse_mode
from .common import build_model, parse_exits, parse_floats
from .registry import command


@command()
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
    thresholds: str | None = None,
    confidence_vocab: int | None = None,
    auto_exits: str | None = None,
    text: str | None = None,
    text_windows: int = 8,
    compile_backend: str = "inductor",
    device: str | None = None,
    dtype: str = "auto",
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
        compile: Also time every budget with its decode step through torch.compile (inductor; CUDA graphs on CUDA; compiling takes a minute or more per budget on CPU).
        thresholds: Also time token-level exits at these thresholds (comma-separated, e.g. 0.5,0.7,0.9) on chat prompts at batch 1 and --batch-size, beside every fixed budget, with agreement along the generated text.
        confidence_vocab: Token-level exits score confidence over the first this many token ids only (e.g. 8192; default all).
        auto_exits: Token-level exits may stop a token only at these exits, comma-separated (e.g. S,L; default all).
        text: With --thresholds: also time teacher-forced decoding along this held-out text (.jsonl or .txt, as `balcony eval --text`): prompts of --prompt-tokens tokens, then the text's next tokens fed one step at a time, so depths and agreement are the text's.
        text_windows: With --text: how many windows of the text are decoded per run.
        compile_backend: The torch.compile backend of --compile (inductor; eager or aot_eager only trace, for quick checks).
        device: cpu, cuda, cuda:1, mps (default: CUDA, then MPS, else the CPU).
        dtype: Weights dtype: auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # assisted generation warns about its own internal arguments
    if quantize:
        parse_mode(quantize)  # a bad mode fails before the model loads
    taus = parse_floats(thresholds, "--thresholds") if thresholds else []
    if text and not taus:
        raise ValueError(f"--text {text!r} times token-level exits along the text: give --thresholds too")
    passages = load_texts(text) if text else None  # a missing file fails before the model loads
    if threads:
        torch.set_num_threads(threads)
    m, tok, trained = build_model(model, exits, exit_layers, exit_kind, dtype=dtype, device=device)
    print(f"[bench] exits {'trained' if trained else 'UNTRAINED (initialised from the last layer): speculative acceptance is low'}", file=sys.stderr)
    result = run_bench(
        m, tok, max_new_tokens=max_new_tokens, prompt_tokens=prompt_tokens, repeats=repeats,
        draft=DraftOptions(draft_length, draft_threshold if draft_threshold and draft_threshold > 0 else None, draft_vocab or None, draft_width),
        batch_size=batch_size, hf=hf, speculative=speculative, quantize=quantize,
        compile=(True if compile_backend == "inductor" else compile_backend) if compile else False, log=lambda s: print(s, file=sys.stderr),
    )
    result["exits_trained"] = trained
    if taus:
        windows = None
        if passages:
            width = prompt_tokens + max_new_tokens - 1
            windows = [w for w in split_windows(tok, ["\n\n".join(passages)], seq_len=width, max_tokens=text_windows * width) if len(w) == width]
            if len(windows) < text_windows:
                raise ValueError(f"--text {text!r} holds {len(windows)} windows of {width} tokens; --text-windows asks for {text_windows}")
        result["token_exits"] = run_token_exit_bench(
            m, tok, taus, batch_sizes=sorted({1, batch_size}), max_new_tokens=max_new_tokens, repeats=repeats, text_windows=windows,
            policy=ExitPolicy(confidence_vocab=confidence_vocab, exits=parse_exits(auto_exits, "--auto-exits")), log=lambda s: print(s, file=sys.stderr),
        )
    print(format_table(result))
    if taus:
        print("\ntoken-level exits (chat prompts, greedy, EOS ignored):")
        print(format_token_exit_bench(result["token_exits"]))
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench.json").write_text(json.dumps(result, indent=2))
    drawn = plot(result, directory / "bench.png")
    print(f"\nwrote {directory / 'bench.json'}" + (f" and {directory / 'bench.png'}" if drawn else " (no chart: matplotlib is not installed)"))
    return 0
