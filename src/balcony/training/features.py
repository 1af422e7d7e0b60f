"""Caching the frozen pass: the hidden states every exit reads, and the teacher's final state.

The base model is frozen, so its forward pass over a corpus gives the same numbers
in every epoch. Running it once and keeping, per token, the hidden state at each
exit layer and the final normed state (the teacher; logits are one head matmul
away) turns later epochs into exit-only work: on the embedded model that removes
the ~1.1 ms/token frozen pass from every step.

Storage is float16 by default: (exits + 1) x hidden x 2 bytes per token, e.g.
4 x 576 x 2 = 4.6 KB per token for three exits on SmolLM2-135M (460 MB per 100k tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modeling.model import BalconyModel
from .packing import PackedData


@dataclass
class FeatureCache:
    """Frozen-pass features for the rows of a `PackedData`.

    Attributes:
        taps: exit layer -> (rows, T, H) hidden state after that many base layers.
        teacher: (rows, T, H) the base's final normed state.
        data: the token rows the features belong to (positions, labels, masks).
    """

    taps: dict[int, torch.Tensor]
    teacher: torch.Tensor
    data: PackedData

    def __len__(self) -> int:
        return self.teacher.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.teacher, *self.taps.values()])

    def batch(self, rows: torch.Tensor | slice, dtype: torch.dtype) -> dict:
        """Rows (indices or a slice) -> a batch dict: the token fields plus ``taps`` and ``teacher`` in `dtype`."""
        out = self.data[rows]
        out["taps"] = {j: t[rows].to(dtype) for j, t in self.taps.items()}
        out["teacher"] = self.teacher[rows].to(dtype)
        return out


@torch.no_grad()
def build_feature_cache(
    model: BalconyModel,
    data: PackedData,
    *,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float16,
    progress: bool = True,
) -> FeatureCache:
    """Run the frozen base once over `data` and keep what every exit needs.

    Args:
        model: The Balcony model (its base is run; exits are not).
        data: Token rows.
        batch_size: Rows per forward.
        dtype: Storage dtype (float16 keeps ~3 significant digits; float32 is exact).
        progress: Show a progress bar.

    Example:
        >>> cache = build_feature_cache(model, train_rows)  # doctest: +SKIP
    """
    n, t = len(data), data.seq_len
    h = model.base.config.hidden_size
    exits = model.config.exit_layers
    taps = {j: torch.empty(n, t, h, dtype=dtype) for j in exits}
    teacher = torch.empty(n, t, h, dtype=dtype)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n * t, desc="frozen pass (cached once)", unit="tok", unit_scale=True)
    device = next(model.base.parameters()).device
    for s in range(0, n, batch_size):
        batch = data[slice(s, s + batch_size)]
        ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        got, final, _ = model.base_pass(ids, exits, None if mask is None else mask.to(device), batch["position_ids"].to(device))
        for j, h in got.items():
            taps[j][s : s + batch_size] = h.to(dtype).cpu()
        teacher[s : s + batch_size] = final.to(dtype).cpu()
        if bar is not None:
            bar.update(ids.numel())
    if bar is not None:
        bar.close()
    return FeatureCache(taps=taps, teacher=teacher, data=data)
