"""Incremental detokenisation with stop strings: text is released as soon as it is safe to show."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # heavy imports stay lazy: the CLI imports this module on every run

    pass


class TextStream:
    """Incremental detokenisation with stop strings.

    Tokens go in one at a time; text comes out as soon as it is safe to show:
    not while it ends in half a UTF-8 character, nor while its tail could be the
    start of a stop string.

    Args:
        tokenizer: A Hugging Face tokenizer.
        stop: Stop strings; the text is cut before the first one.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._text = ""
        self.sent = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """The text released so far."""
        return self._text[: self.sent]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _pull(self, final: bool) -> None:
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def add(self, token: int) -> str:
        """Append one token; returns the newly releasable text (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self._pull(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: release whatever is held back."""
        if self.stopped:
            return ""
        if self._read < len(self.ids):
            self._pull(final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:
            start = max(0, self.sent - self._longest)
            hits = [p for p in (self._text.find(s, start) for s in self.stop) if p >= 0]
            if hits:
                cut = min(hits)
                out = self._text[self.sent:cut]
                self._text = self._text[:cut]
                self.sent = cut
                self.stopped = True
                return out
        end = len(self._text)
        if not final and self.stop:
            hold = max((k for s in self.stop for k in range(1, len(s)) if self._text.endswith(s[:k])), default=0)
            end = max(self.sent, end - hold)
        out = self._text[self.sent:end]
        self.sent = end
        return out
