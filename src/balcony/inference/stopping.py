"""Input checks and per-sequence stopping (EOS ids, stop strings) for a decoding batch."""

from __future__ import annotations

from typing import Sequence

import torch


def check_teacher_tokens(tokens: torch.Tensor | None, batch: int, max_new_tokens: int, device: torch.device) -> torch.Tensor | None:
    """The (B, >= max_new_tokens - 1) ids a teacher-forced stream feeds, on `device`; a ValueError naming the shape otherwise."""
    if tokens is None:
        return None
    if not torch.is_tensor(tokens) or tokens.dim() != 2 or tokens.shape[0] != batch or tokens.shape[1] < max_new_tokens - 1:
        shape = tuple(tokens.shape) if torch.is_tensor(tokens) else type(tokens).__name__
        raise ValueError(f"teacher_tokens has shape {shape}: give (batch={batch}, >= max_new_tokens - 1 = {max_new_tokens - 1}) token ids, "
                         "the text fed after each step")
    return tokens.to(device=device, dtype=torch.long)


def check_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int) -> None:
    """Raise a ValueError naming the offending value for inputs no decoder can use."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
        raise ValueError(f"the prompt is empty or not (batch, seq_len): input_ids has shape {shape}; give at least one token")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
        empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"the prompt of sequence(s) {empty} is empty: its attention_mask row is all zeros")
        right = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
        if right:
            raise ValueError(
                f"sequence(s) {right} end in padding (attention_mask is 0 in the last column): the batch is right-padded, "
                "but new tokens follow the last column, so pad prompts on the left (tokenizer.padding_side = 'left')"
            )


class StopChecker:
    """Per-sequence EOS and stop-string bookkeeping for a batch.

    Args:
        batch_size: B.
        eos_token_id: Token id(s) that end a sequence.
        stop_strings: Strings that end a sequence once they appear in its decoded output.
        tokenizer: Needed to decode for stop strings.
        pad_token_id: What a finished sequence emits (default: the first EOS id, else 0).
        device: Where the flags live.
    """

    def __init__(
        self,
        batch_size: int,
        eos_token_id: int | Sequence[int] | None,
        stop_strings: str | Sequence[str] | None,
        tokenizer,
        pad_token_id: int | None,
        device: torch.device,
    ):
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        self.eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else [s for s in (stop_strings or []) if s]
        if self.stop_strings and tokenizer is None:
            raise ValueError(f"stop_strings={self.stop_strings!r} need a tokenizer to decode the output; pass tokenizer=")
        self.tokenizer = tokenizer
        self.fill = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        self.done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.active = self.eos is not None or bool(self.stop_strings)
        # Decoding the last few tokens is enough to see a stop string appear (a token is >= 1 character).
        self._tail = max((len(s) for s in self.stop_strings), default=0) + 4
        self._history: list[list[int]] = [[] for _ in range(batch_size)]

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """(B,) sampled tokens -> (B,) tokens with finished sequences' replaced by the fill token."""
        if not self.active:
            return token
        token = torch.where(self.done, torch.full_like(token, self.fill), token)
        if self.eos is not None:
            hit = torch.isin(token, self.eos)
        else:
            hit = torch.zeros_like(self.done)
        if self.stop_strings:
            hits = []
            for b, t in enumerate(token.tolist()):  # a host sync, but decoding text needs the ids anyway
                hist = self._history[b]
                if not bool(self.done[b]):
                    hist.append(t)
                text = self.tokenizer.decode(hist[-self._tail :], skip_special_tokens=False)
                hits.append(not bool(self.done[b]) and any(s in text for s in self.stop_strings))
            hit = hit | torch.tensor(hits, device=token.device)
        self.done = self.done | hit
        return token

    def all_done(self) -> bool:
        return self.active and bool(self.done.all())
