"""The training forward: one pass of the frozen base feeding every exit, and exits run on cached hidden states."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass
class DistillOutput:
    """One frozen pass: the teacher's final state and every exit's state.

    Attributes:
        teacher_hidden: (B, T, H) final-norm output of the full model (no grad when frozen).
        exit_hidden: exit layer -> (B, T, H) normed exit output, with grad into its own module only.
    """

    teacher_hidden: torch.Tensor
    exit_hidden: dict[int, torch.Tensor]


class DistillPasses:
    """`distill_forward`, `base_pass` and `run_exits` for `BalconyModel` (a mixin; uses its layer runners)."""

    def distill_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        exits: Iterable[int] | None = None,
    ) -> DistillOutput:
        """One pass of the base that feeds every exit: the training forward.

        The base runs once (without autograd when frozen); each exit's module
        runs on a detached copy of the hidden state at its layer, so its loss
        flows only into its own parameters. The LM head is left to the loss,
        which applies it chunk by chunk.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: optional (B, T) padding mask.
            position_ids: optional (B, T) positions (reset per packed document).
            exits: which exits to run (default: all).

        Returns:
            DistillOutput with teacher_hidden (B, T, H) and exit_hidden {j: (B, T, H)}.
        """
        wanted = sorted(self.config.exit_layers if exits is None else {self.resolve_exit(e) for e in exits})
        for j in wanted:
            if str(j) not in self.exits:
                raise ValueError(f"exit layer {j} has no Balcony module: {self._accepted()}")
        frozen = not self.base_trainable
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            taps, teacher, (masks, layer_kwargs) = self.base_pass(input_ids, wanted, attention_mask, position_ids)
        exit_hidden = {}
        for j in wanted:
            tap = taps[j].detach() if frozen else taps[j]
            exit_hidden[j] = self._run_exit(j, tap, masks, layer_kwargs, None, False)
        return DistillOutput(teacher_hidden=teacher, exit_hidden=exit_hidden)

    def base_pass(
        self,
        input_ids: torch.Tensor,
        layers: Iterable[int],
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor, tuple[dict, dict]]:
        """All N base layers once, keeping the hidden state after each layer in `layers`.

        Returns:
            (taps {j: (B, T, H)}, teacher (B, T, H) final-norm output, (masks, layer kwargs)
            for running exits on the taps).
        """
        want = set(layers)
        taps: dict[int, torch.Tensor] = {}
        hidden, masks, layer_kwargs = self._prepare(input_ids, None, attention_mask, position_ids, None)
        for i in range(self.num_layers):
            hidden = self._run_layer(i, hidden, masks, layer_kwargs, None, False)
            if i + 1 in want:
                taps[i + 1] = hidden
        return taps, self.parts.norm(hidden), (masks, layer_kwargs)

    def run_exits(
        self,
        taps: dict[int, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """Run exit modules on hidden states saved from an earlier frozen pass.

        This is the training step on cached features: the base is not run at all.

        Args:
            taps: exit layer -> (B, T, H) hidden state after that many base layers.
            attention_mask: optional (B, T) padding mask.
            position_ids: optional (B, T) positions (as in the pass that made the taps).

        Returns:
            exit layer -> (B, T, H) normed exit state.
        """
        ref = next(iter(taps.values()))
        with torch.no_grad():
            _, masks, layer_kwargs = self._prepare(None, ref, attention_mask, position_ids, None)
        return {j: self._run_exit(j, tap, masks, layer_kwargs, None, False) for j, tap in taps.items()}
