"""Sampling: the one definition of the distribution a token is drawn from (engine and speculative decoding share it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    """(..., V) logits -> (..., V) probabilities after temperature, top-k and top-p."""
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


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(..., V) (possibly unnormalised) probabilities -> (...,) samples, by the exponential trick (no host sync)."""
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: argmax when greedy, else a draw from `logits_to_probs`."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        # Only k candidates can win: filter and draw among them, so the noise, the top-p
        # sort and the softmax cost (B, k) instead of (B, V) (a 49k vocab made sampling
        # a third of batched decoding). Same distribution as `logits_to_probs` (up to ties at the k-th value).
        vals, idx = torch.topk(logits.float() / cfg.temperature, cfg.top_k, dim=-1)  # sorted, descending
        if cfg.top_p < 1.0:
            probs = vals.softmax(-1)
            vals = vals.masked_fill((probs.cumsum(-1) - probs) >= cfg.top_p, float("-inf"))
        choice = sample_from_probs(vals.softmax(-1), generator)
        return idx.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    return sample_from_probs(logits_to_probs(logits, cfg), generator)
