"""`balcony info`: the base model, its exits and what each budget runs."""

from __future__ import annotations

from ..modeling.cost import ideal_speedup
from .common import build_model
from .registry import command


@command()
def info(model: str | None = None, exits: str | None = None) -> int:
    """Show the base model, its exits and the parameters each budget runs.

    Args:
        model: Base model: hub id or local path (default: the embedded SmolLM2-135M-Instruct).
        exits: Directory (or hub id) of trained exits; without it, fresh untrained exits are shown.
    """
    m, tok, trained = build_model(model, exits, device="cpu", dtype="float32")  # counts only: no accelerator needed
    cfg = m.config
    print(f"base model:   {cfg.base_model_name_or_path} (revision {cfg.base_model_revision}), {cfg.model_type}, {m.num_layers} layers")
    print(f"exits:        {', '.join(map(str, cfg.exit_layers))} ({cfg.exit_kind}, init {cfg.init}; {'trained, from ' + exits if trained else 'untrained'})")

    full = m.count_parameters(None)
    # ideal speed-up counts the LM head too (28M of SmolLM2's 135M parameters), as `balcony bench` does
    print(f"{'budget':<8}{'layers':>8}{'params (non-emb)':>20}{'fraction':>10}{'ideal speed-up':>16}")
    for name, j in m.budgets.items():
        p = m.count_parameters(j)
        print(f"{name:<8}{j:>8}{p:>20,}{p / full:>10.2f}{ideal_speedup(m, j):>15.2f}x")
    m.print_trainable_parameters()
    return 0
