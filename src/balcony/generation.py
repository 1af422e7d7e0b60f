"""Where decoding happens: prefill, one-token decode and sampling at one budget.

Kept as a few small functions in the spirit of gpt-fast. A KV cache holds only
the layers the chosen budget runs; switching budget is just another call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .model import BalconyModel, Exit


@dataclass
class SamplingConfig:
    """How to pick the next token.

    Args:
        do_sample: False for greedy decoding.
        temperature: Softmax temperature (> 0) when sampling.
        top_k: Keep only the k most likely tokens (None or 0: all).
        top_p: Keep the smallest set of tokens whose probability reaches p (1.0: all).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (use do_sample=False for greedy)")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def logits_to_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """(B, V) logits -> (B, V) probabilities after temperature, top-k and top-p."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (always keep the first).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= cfg.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens. Sampling uses the exponential trick: no host sync."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, cfg)
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)


def prefill(model: BalconyModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, exit: int):
    """Run the prompt at one budget; returns (last-position logits (B, V), cache)."""
    out = model(input_ids, attention_mask, exit=exit, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.cache


def decode_one_token(model: BalconyModel, token: torch.Tensor, attention_mask: torch.Tensor | None, cache, exit: int):
    """One decode step: (B,) last tokens -> (B, V) next logits, extending `cache` in place."""
    out = model(token[:, None], attention_mask, exit=exit, cache=cache, use_cache=True)
    return out.logits[:, -1]


def generate_stream(
    model: BalconyModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    exit: Exit = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
    stop: Callable[[torch.Tensor], bool] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield (B,) new tokens one step at a time at the chosen budget.

    Sequences that have produced EOS keep yielding EOS. See `generate` for the arguments.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"the prompt is empty: input_ids has shape {tuple(input_ids.shape)}; give at least one token")
    cfg = SamplingConfig(do_sample, temperature, top_k, top_p)
    j = model.resolve_exit(exit)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=input_ids.device)
    logits, cache = prefill(model, input_ids, attention_mask, j)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        token = sample(logits, cfg, generator)
        if eos.numel():
            token = torch.where(done, eos[0], token)
            done = done | torch.isin(token, eos)
        yield token
        if step == max_new_tokens - 1 or (eos.numel() and bool(done.all())) or (stop is not None and stop(token)):
            return
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        logits = decode_one_token(model, token, attention_mask, cache, j)


def generate(
    model: BalconyModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    exit: Exit = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Generate at one budget; returns (B, T + new) ids (prompt included).

    Args:
        model: The Balcony model.
        input_ids: (B, T) prompt ids, left-padded when lengths differ.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        exit: Budget name, exit layer, or None for the full model.
        max_new_tokens: How many tokens to add (>= 1).
        do_sample, temperature, top_k, top_p: Sampling; greedy by default.
        eos_token_id: Stop a sequence at this token (or any of these).
        generator: Seeded `torch.Generator` for reproducible sampling.

    Example:
        >>> out = model.generate(ids, exit="S", max_new_tokens=16)  # doctest: +SKIP
    """
    tokens = list(
        generate_stream(
            model,
            input_ids,
            attention_mask,
            exit=exit,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eos_token_id,
            generator=generator,
        )
    )
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)
