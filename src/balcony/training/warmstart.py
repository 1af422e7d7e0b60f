"""Closed-form warm start of an exit: least squares from layer j to the last layer.

Gradient warm-ups (``warmup_loss="logit_mse"``) spend a quarter of a CPU run
moving the exit from "the last layer, fed the wrong input" to "roughly the
final hidden state". Most of that move is linear in the exit's MLP features, so
it can be solved in closed form from the cached frozen pass in seconds:

    o = r + a Wᵀ            (decoder layer output; r: residual + attention, a: MLP features)
    min_W  Σ_t ‖ r_t + a_t Wᵀ − s_t u_t ‖²  + λ ‖W‖²

where ``u_t`` is the teacher's final hidden state with unit RMS (its normed state
divided by the final norm's gain) and ``s_t`` = RMS(r_t), so the fit changes the
direction the exit's norm sees, not its scale. Only the MLP's output projection
(``mlp.down_proj`` in Llama-like layers) is replaced; everything else keeps its
init. The fit is a ridge regression on (features x features) normal equations
accumulated in float64, one pass over at most `max_tokens` cached tokens.
"""

from __future__ import annotations

import torch

from ..modeling.model import BalconyModel
from .features import FeatureCache

MLP_OUT = "mlp.down_proj"


@torch.no_grad()
def lstsq_warm_start(
    model: BalconyModel,
    features: FeatureCache,
    exits: list[int] | None = None,
    *,
    max_tokens: int = 65536,
    ridge: float = 1e-3,
    batch_size: int = 8,
) -> dict[int, float]:
    """Fit each exit's MLP output projection in closed form; returns the fit's R² per exit.

    Args:
        model: The Balcony model; its decoder exits are changed in place.
        features: The cached frozen pass (taps at every exit and the teacher's normed state).
        exits: Which exits to fit (default: every exit in the cache with a decoder layer).
        max_tokens: Cached tokens the normal equations are accumulated over.
        ridge: λ relative to the mean diagonal of aᵀa.
        batch_size: Rows per exit forward.

    Example:
        >>> cache = build_feature_cache(model, rows)  # doctest: +SKIP
        >>> lstsq_warm_start(model, cache)  # doctest: +SKIP
        {14: 0.957, 17: 0.957, 20: 0.952}
    """
    exits = list(features.taps) if exits is None else exits
    device = next(model.base.parameters()).device
    # The final norm's per-channel gain, whatever its parametrisation (w, or 1 + w as in Gemma):
    # the norm of an all-ones vector (RMS 1) is exactly that gain.
    hidden = model.base.config.hidden_size
    final_gain = model.parts.norm(torch.ones(1, hidden, device=device, dtype=next(model.base.parameters()).dtype)).double()[0]
    if (final_gain.abs() < 1e-6).any():
        raise ValueError("the base's final norm has (near-)zero gains; the lstsq warm start cannot recover the final hidden state")
    rows = min(len(features), max(1, max_tokens // features.data.seq_len))
    fitted: dict[int, float] = {}
    was = model.training
    model.eval()
    try:
        for j in exits:
            exit = model.exits[str(model.resolve_exit(j))]
            if exit.layer is None or MLP_OUT not in dict(exit.layer.named_modules()):
                raise ValueError(f"exit {j} has no {MLP_OUT!r} (exit kind {model.config.exit_kind!r}); the lstsq warm start fits a decoder or MLP exit")
            proj = exit.layer.get_submodule(MLP_OUT)
            if getattr(proj, "bias", None) is not None:
                raise ValueError(f"exit {j}: {MLP_OUT} has a bias; the lstsq warm start supports bias-free projections")
            got: dict[str, torch.Tensor] = {}
            hooks = [
                proj.register_forward_hook(lambda m, inp, out: got.update(a=inp[0], mlp=out)),
                exit.norm.register_forward_pre_hook(lambda m, inp: got.__setitem__("o", inp[0])),
            ]
            feat = proj.in_features
            ata = torch.zeros(feat, feat, dtype=torch.float64, device=device)
            aty = torch.zeros(feat, proj.out_features, dtype=torch.float64, device=device)
            yty = torch.zeros((), dtype=torch.float64, device=device)
            try:
                for s in range(0, rows, batch_size):
                    idx = torch.arange(s, min(s + batch_size, rows))
                    batch = features.batch(idx, proj.weight.dtype)
                    mask = batch.get("attention_mask")
                    model.run_exits({j: batch["taps"][j].to(device)}, None if mask is None else mask.to(device), batch["position_ids"].to(device))
                    a = got["a"].double().flatten(0, 1)
                    r = (got["o"] - got["mlp"]).double().flatten(0, 1)  # the layer output without the MLP's share
                    u = batch["teacher"].to(device).double().flatten(0, 1) / final_gain
                    y = u * r.pow(2).mean(-1, keepdim=True).sqrt() - r
                    if mask is not None:
                        keep = mask.to(device).flatten().bool()
                        a, y = a[keep], y[keep]
                    ata += a.T @ a
                    aty += a.T @ y
                    yty += y.pow(2).sum()
            finally:
                for h in hooks:
                    h.remove()
            lam = ridge * ata.diagonal().mean()
            w = torch.linalg.solve(ata + lam * torch.eye(feat, dtype=ata.dtype, device=device), aty)
            resid = yty - 2 * (w * aty).sum() + (w * (ata @ w)).sum()
            fitted[j] = float(1 - resid / yty)
            proj.weight.copy_(w.T.to(proj.weight.dtype))
    finally:
        model.train(was)
    return fitted
