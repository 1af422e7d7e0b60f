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
        self._matchers = [_StopMatcher(s) for s in self.stop]
        self._scanned = 0  # characters of `_text` the matchers have seen
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
        if self._matchers:
            # Each matcher reads the new characters once (linear in the text and the stop string, whatever their
            # lengths); the text is cut before the earliest stop string seen so far.
            for m in self._matchers:
                m.feed(self._text, self._scanned)
            self._scanned = len(self._text)
            hits = [m.end - len(m.stop) for m in self._matchers if m.end is not None]
            if hits:
                cut = max(min(hits), self.sent)
                out = self._text[self.sent:cut]
                self._text = self._text[:cut]
                self.sent = cut
                self.stopped = True
                return out
        end = len(self._text)
        if not final and self._matchers:
            # Hold back the longest tail that could still grow into a stop string.
            hold = max(m.state for m in self._matchers)
            end = max(self.sent, end - hold)
        out = self._text[self.sent:end]
        self.sent = end
        return out


class _StopMatcher:
    """Knuth-Morris-Pratt over a growing text: where one stop string first ends, and how much of it the text ends in.

    `state` is the length of the longest prefix of the stop string that the text
    seen so far ends with (what must be held back); `end` is the index just past
    the first full occurrence, or None. Feeding n characters costs O(n) amortised,
    so a long stop string cannot make each token quadratic.
    """

    def __init__(self, stop: str):
        self.stop = stop
        self.fail = [0] * len(stop)  # fail[i]: longest proper prefix of stop[:i + 1] that is also its suffix
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k
        self.state = 0
        self.end: int | None = None

    def feed(self, text: str, start: int) -> None:
        """Read `text[start:]` (the characters appended since the last call)."""
        if self.end is not None:
            return
        stop, fail, k, n = self.stop, self.fail, self.state, len(self.stop)
        for i in range(start, len(text)):
            c = text[i]
            while k and c != stop[k]:
                k = fail[k - 1]
            if c == stop[k]:
                k += 1
                if k == n:
                    self.end = i + 1
                    break
        self.state = k
