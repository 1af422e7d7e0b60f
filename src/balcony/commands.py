"""The subcommands behind `balcony ...` (registered with `cli.command`)."""

from __future__ import annotations

import sys
import time

import torch

from .cli import command
from .config import BalconyConfig
from .loading import DEFAULT_EXITS, DEFAULT_MODEL, is_default, load_base
from .model import BalconyModel

DEMO_PROMPT = "Explain in two sentences why the sky is blue."


def default_exit_layers(num_layers: int) -> list[int]:
    """The paper's relative exit depths (0.47 / 0.56 / 0.66 of the layers): 14, 17, 20 of 30."""
    return sorted({max(1, min(num_layers - 1, round(num_layers * f))) for f in (0.47, 0.56, 0.66)})


def build_model(
    model: str | None,
    exits: str | None,
    exit_layers: list[int] | None = None,
    exit_kind: str = "decoder",
    dtype: str = "float32",
    device: str | None = None,
) -> tuple[BalconyModel, object, bool]:
    """Base + exits for a command; returns (model, tokenizer, trained?)."""
    base, tok = load_base(model, dtype=dtype, device=device)
    if exits:
        return BalconyModel.from_pretrained(base, exits), tok, True
    n = base.config.num_hidden_layers
    layers = exit_layers or (DEFAULT_EXITS[DEFAULT_MODEL] if is_default(model) else default_exit_layers(n))
    return BalconyModel(base, BalconyConfig(exit_layers=layers, exit_kind=exit_kind)), tok, False


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
) -> int:
    """Generate text at one compute budget, streaming tokens as they come.

    Args:
        prompt: The text to answer or continue.
        budget: A budget name (S, M, L, XL, ...) or an exit layer number.
        max_new_tokens: How many tokens to generate at most.
        model: Base model: hub id or local path (default: the embedded SmolLM2-135M-Instruct).
        exits: Directory (or hub id) of trained exits; without it, fresh untrained exits are attached.
        sample: Sample instead of greedy decoding.
        temperature: Sampling temperature.
        top_k: Sample only among the k most likely tokens.
        top_p: Nucleus sampling mass.
        seed: Random seed for sampling.
        chat: Wrap the prompt in the model's chat template when it has one.
    """
    from .generation import generate_stream

    m, tok, trained = build_model(model, exits)
    j = m.resolve_exit(budget)
    ids = encode_prompt(tok, prompt, chat)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    first = None
    out: list[int] = []
    printed = ""
    for token in generate_stream(
        m, ids, exit=j, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature,
        top_k=top_k, top_p=top_p, eos_token_id=tok.eos_token_id, generator=gen,
    ):
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
    print(
        f"\n[budget {name}: layers 1-{j} of {m.num_layers}; {len(out)} tokens; "
        f"prefill {1000 * ((first or t1) - t0):.0f} ms; decode {rate:.1f} tok/s]{note}",
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
    full = m.count_parameters(None)
    print(f"{'budget':<8}{'layers':>8}{'params (non-emb)':>20}{'fraction':>10}{'ideal speed-up':>16}")
    for name, j in m.budgets.items():
        p = m.count_parameters(j)
        print(f"{name:<8}{j:>8}{p:>20,}{p / full:>10.2f}{full / p:>15.2f}x")
    m.print_trainable_parameters()
    return 0


@command
def demo(
    model: str | None = None,
    exits: str | None = None,
    max_new_tokens: int = 32,
    prompt: str = DEMO_PROMPT,
) -> int:
    """The main job on the embedded default: answer one prompt at every budget and time each.

    Args:
        model: Base model: hub id or local path (default: the embedded SmolLM2-135M-Instruct).
        exits: Directory of trained exits (default: fresh exits initialised from the last layer).
        max_new_tokens: Tokens to generate per budget.
        prompt: The prompt answered at every budget.
    """
    from .generation import generate as gen

    m, tok, trained = build_model(model, exits)
    ids = encode_prompt(tok, prompt, chat=True)
    print(f"prompt: {prompt!r} ({ids.shape[1]} tokens); exits {'trained' if trained else 'UNTRAINED (initialised from the last layer)'}")
    gen(m, ids, exit=None, max_new_tokens=4)  # warm-up
    rows = []
    full = m.count_parameters(None)
    for name, j in m.budgets.items():
        t0 = time.perf_counter()
        out = gen(m, ids, exit=j, max_new_tokens=max_new_tokens)
        dt = time.perf_counter() - t0
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).replace("\n", " ")
        rows.append((name, j, max_new_tokens / dt, full / m.count_parameters(j), text))
    full_rate = rows[-1][2]
    print(f"{'budget':<7}{'layers':>7}{'tok/s':>8}{'speed-up':>10}{'ideal':>8}  output")
    for name, j, rate, ideal, text in rows:
        print(f"{name:<7}{j:>7}{rate:>8.1f}{rate / full_rate:>9.2f}x{ideal:>7.2f}x  {text[:70]}")
    return 0
