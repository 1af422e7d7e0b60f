"""The subcommands behind `balcony ...` (registered with `cli.command`)."""

from __future__ import annotations

import sys
import time

import torch

from .cli import command
from .config import BalconyConfig
from .loading import DEFAULT_EXITS, DEFAULT_MODEL, default_exit_layers, is_default, load_base
from .model import BalconyModel



def build_model(
    model: str | None,
    exits: str | None,
    exit_layers: list[int] | None = None,
    exit_kind: str = "decoder",
    dtype: str = "float32",
    device: str | None = None,
    quantize: str | None = None,
) -> tuple[BalconyModel, object, bool]:
    """Base + exits for a command, weight-quantized if asked (`BalconyModel.quantize`); returns (model, tokenizer, trained?)."""
    if quantize:
        from .quantize import parse_mode

        parse_mode(quantize)  # a bad mode fails before the model loads
    base, tok = load_base(model, dtype=dtype, device=device)
    if exits:
        m, trained = BalconyModel.from_pretrained(base, exits), True
    else:
        n = base.config.num_hidden_layers
        layers = exit_layers or (DEFAULT_EXITS[DEFAULT_MODEL] if is_default(model) else default_exit_layers(n))
        m, trained = BalconyModel(base, BalconyConfig(exit_layers=layers, exit_kind=exit_kind)), False
    if quantize:
        m.quantize(quantize)
    return m, tok, trained


def encode_prompt(tok, prompt: str, chat: bool) -> torch.Tensor:
    """Prompt -> (1, T) ids, through the chat template when asked and available."""
    if not prompt.strip():
        raise ValueError("the prompt is empty: give some text to continue")
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tok(prompt, return_tensors="pt").input_ids


@command
def generate(
    prompt: str,
    budget: str = "XL",
    max_new_tokens: int = 64,
    model: str | None = None,
    exits: str | None = None,
    sample: bool = False,
    temperature: float = 0.7,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int = 0,
    chat: bool = True,
    speculative: bool = False,
    draft_length: int = 4,
    draft_threshold: float | None = None,
    draft_vocab: int | None = None,
    draft_width: int = 1,
    stop: str | None = None,
    compile: bool = False,
    quantize: str | None = None,
) -> int:
    """Generate text at one compute budget, streaming tokens as they come.

    Args:
        prompt: The text to answer or continue.
        budget: A budget name (S, M, L, XL, ...) or an exit layer number; with --speculative, the draft budget.
        max_new_tokens: How many tokens to generate at most.
        model: Base model: hub id or local path (default: the embedded SmolLM2-135M-Instruct).
        exits: Directory (or hub id) of trained exits; without it, fresh untrained exits are attached.
        sample: Sample instead of greedy decoding.
        temperature: Sampling temperature.
        top_k: Sample only among the k most likely tokens.
        top_p: Nucleus sampling mass.
        seed: Random seed for sampling.
        chat: Wrap the prompt in the model's chat template when it has one.
        speculative: Self-speculative decoding: draft at --budget, verify with the remaining layers (full-model output).
        draft_length: Tokens drafted per verify pass (with --speculative).
        draft_threshold: Stop a draft once the exit's top-1 probability falls below this (with --speculative).
        draft_vocab: Draft among the first this many token ids only, a cheaper draft head (with --speculative; e.g. 8192).
        draft_width: Candidates drafted for the next position, verified side by side (with --speculative, greedy, --draft-length 1).
        stop: Stop once the output contains this string.
        compile: Compile the decode step with torch.compile (slow start; plain decoding only).
        quantize: Weight-only quantization: int8 (per channel) or int4 (groups of 32; int4-64, int4-128).
    """
    from .engine import generate_stream
    from .speculative import SpeculativeStats, speculative_stream

    m, tok, trained = build_model(model, exits, quantize=quantize)
    j = m.resolve_exit(budget)
    ids = encode_prompt(tok, prompt, chat)
    gen = torch.Generator().manual_seed(seed)
    common = dict(
        max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=tok.eos_token_id, generator=gen, stop_strings=[stop] if stop else None, tokenizer=tok,
    )
    stats = None
    if speculative:
        stats = SpeculativeStats(j, draft_length)
        stream = speculative_stream(
            m, ids, exit=j, draft_length=draft_length, draft_threshold=draft_threshold, draft_vocab=draft_vocab,
            draft_width=draft_width, stats=stats, **common,
        )
    else:
        stream = generate_stream(m, ids, exit=j, compile=compile, **common)
    t0 = time.perf_counter()
    first = None
    out: list[int] = []
    printed = ""
    for token in stream:
        if first is None:
            first = time.perf_counter()
        if token.item() == tok.eos_token_id:
            break
        out.append(token.item())
        text = tok.decode(out, skip_special_tokens=True)
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    t1 = time.perf_counter()
    name = next((n for n, l in m.budgets.items() if l == j), str(j))
    decode_s = t1 - (first or t1)
    rate = (len(out) - 1) / decode_s if len(out) > 1 and decode_s > 0 else float("nan")
    note = "" if trained or j == m.num_layers else " (exits untrained: pass --exits DIR for trained ones)"
    if stats is not None:
        head = (
            f"speculative: draft budget {name} (layers 1-{j} + exit), verify layers {j + 1}-{m.num_layers}; "
            f"acceptance {stats.acceptance_rate:.0%}, {stats.mean_accepted_length:.2f} tokens per verify pass, "
            f"{stats.rounds} verify passes"
        )
    else:
        head = f"budget {name}: layers 1-{j} of {m.num_layers}"
    print(
        f"\n[{head}; {len(out)} tokens; prefill {1000 * ((first or t1) - t0):.0f} ms; decode {rate:.1f} tok/s]{note}",
        file=sys.stderr,
    )
    return 0


@command
def info(model: str | None = None, exits: str | None = None) -> int:
    """Show the base model, its exits and the parameters each budget runs.

    Args:
        model: Base model: hub id or local path (default: the embedded SmolLM2-135M-Instruct).
        exits: Directory (or hub id) of trained exits; without it, fresh untrained exits are shown.
    """
    m, tok, trained = build_model(model, exits)
    cfg = m.config
    print(f"base model:   {cfg.base_model_name_or_path} (revision {cfg.base_model_revision}), {cfg.model_type}, {m.num_layers} layers")
    print(f"exits:        {', '.join(map(str, cfg.exit_layers))} ({cfg.exit_kind}, init {cfg.init}; {'trained, from ' + exits if trained else 'untrained'})")
    from .bench import ideal_speedup

    full = m.count_parameters(None)
    # ideal speed-up counts the LM head too (28M of SmolLM2's 135M parameters), as `balcony bench` does
    print(f"{'budget':<8}{'layers':>8}{'params (non-emb)':>20}{'fraction':>10}{'ideal speed-up':>16}")
    for name, j in m.budgets.items():
        p = m.count_parameters(j)
        print(f"{name:<8}{j:>8}{p:>20,}{p / full:>10.2f}{ideal_speedup(m, j):>15.2f}x")
    m.print_trainable_parameters()
    return 0
