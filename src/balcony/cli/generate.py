"""`balcony generate`: text at one budget (or self-speculatively), streamed."""

from __future__ import annotations

import sys
import time

from ..inference.devices import execution_device, make_generator
from ..inference.engine import generate_stream
from ..inference.options import ExitPolicy
from ..inference.speculative import SpeculativeStats, speculative_stream
from ..inference.token_exits import (
    AUTO_EXIT,
    TokenExitStats,
    checkpoints,
    token_exit_stream,
)
from .common import build_model, encode_prompt, parse_exits
from .registry import command


@command()
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
    threshold: float = 0.9,
    confidence_vocab: int | None = None,
    auto_exits: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
) -> int:
    """Generate text at one compute budget, streaming tokens as they come.

    Args:
        prompt: The text to answer or continue.
        budget: A budget name (S, M, L, XL, ...) or an exit layer number; auto: token-level exits (see --threshold); with --speculative, the draft budget.
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
        threshold: With --budget auto: a token leaves at the first exit whose top-1 probability is above this (0: always the first exit, 1: never early).
        confidence_vocab: With --budget auto: score confidence over the first this many token ids only (a cheaper check; e.g. 8192).
        auto_exits: With --budget auto: only these exits may stop a token, comma-separated (e.g. S,L; default all; `balcony eval --calibrate` says which pay).
        device: cpu, cuda, cuda:1, mps (default: CUDA, then MPS, else the CPU).
        dtype: Weights dtype: auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16.
    """
    m, tok, trained = build_model(model, exits, quantize=quantize, device=device, dtype=dtype)
    auto = budget.strip().lower() == AUTO_EXIT
    if auto and speculative:
        raise ValueError("--budget auto (token-level exits) and --speculative are two decoding modes: pick one")
    j = m.num_layers if auto else m.resolve_exit(budget)
    where = execution_device(m)
    ids = encode_prompt(tok, prompt, chat).to(where)
    gen = make_generator(seed, where)  # on the model's device: a generator draws only for tensors of its own
    common = dict(
        max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k, top_p=top_p,
        eos_token_id=tok.eos_token_id, generator=gen, stop_strings=[stop] if stop else None, tokenizer=tok,
    )
    stats = token_stats = None
    if auto:
        policy = ExitPolicy(threshold=threshold, confidence_vocab=confidence_vocab, exits=parse_exits(auto_exits, "--auto-exits"))
        token_stats = TokenExitStats(checkpoints(m, policy))
        stream = token_exit_stream(m, ids, policy=policy, stats=token_stats, **common)
    elif speculative:
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
    if token_stats is not None:
        shares = ", ".join(f"{next((n for n, l in m.budgets.items() if l == k), k)} {token_stats.fraction(k):.0%}" for k in token_stats.checkpoints)
        head = f"token-level exits at threshold {threshold:g}: {token_stats.mean_layers:.1f} layers per token on average ({shares})"
        note = "" if trained else " (exits untrained: pass --exits DIR for trained ones)"
    elif stats is not None:
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
