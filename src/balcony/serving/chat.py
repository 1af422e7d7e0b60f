"""Chat prompts: the template rendered and tokenised so that control tokens inside message content stay plain text.

Rendering a chat template and tokenising the result parses every special-token
string in it, the user's as well as the template's: a user message holding
``<|im_end|>\\n<|im_start|>system`` then closes its own turn and opens a
system turn. `ChatEncoder` tokenises the template's control tokens as control
tokens and everything else as text, so the same characters in content are just
characters. A conversation whose content holds no special-token string is
tokenised exactly as before (and as ``apply_chat_template(tokenize=True)``
does); ``chat_special_tokens=True`` keeps the old behaviour for every message.
"""

from __future__ import annotations

import copy
import re
import secrets
from typing import Any


class ChatEncoder:
    """Renders chat messages with the tokenizer's template and tokenises them.

    Args:
        tokenizer: A Hugging Face tokenizer (its chat template, if any, is used;
            without one, ``role: content`` lines).
        special_in_content: Parse special-token strings in message content as control tokens (unsafe).

    Example:
        >>> ids, text = ChatEncoder(tok).encode([{"role": "user", "content": "hi <|im_end|>"}])  # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, special_in_content: bool = False):
        self.tokenizer = tokenizer
        self.special_in_content = special_in_content
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        specials = {t.content: i for i, t in decoder.items() if getattr(t, "special", False) and t.content}
        specials.update({t: tokenizer.convert_tokens_to_ids(t) for t in getattr(tokenizer, "all_special_tokens", []) if t and t not in specials})
        self.specials = specials
        self._pattern = re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True)))) if specials else None
        # A copy that reads special-token strings as text. The original's own switch for this (split_special_tokens)
        # flips state shared by every thread, and prompts are tokenised on several.
        self.text_tokenizer = copy.deepcopy(tokenizer)
        self.text_tokenizer.split_special_tokens = True
        self._text_ids("warm up")  # the first call applies the switch; later ones only read it

    def holds_special(self, text: str) -> bool:
        """Whether `text` contains a special-token string."""
        return self._pattern is not None and self._pattern.search(text) is not None

    def encode(self, messages: list[dict[str, str]]) -> tuple[list[int], str]:
        """(prompt ids, prompt text) for `messages` ({role, content} dicts), with the assistant turn opened.

        Raises:
            ValueError: The chat template rejected the conversation (e.g. the order of roles).
        """
        text = self.render(messages)
        if self.special_in_content or not any(self.holds_special(m["content"]) for m in messages):
            return self._ids(text), text
        if not self.has_template:  # no control tokens of its own: all of it is text
            return self._text_ids(text), text
        return self._split_encode(messages), text

    def render(self, messages: list[dict[str, str]]) -> str:
        if not self.has_template:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - jinja raises whatever the template raises
            raise ValueError(str(e)) from None

    def _split_encode(self, messages: list[dict[str, str]]) -> list[int]:
        """Render with a marker for each content, then tokenise: control tokens only where the template put them."""
        nonce = secrets.token_hex(8)
        markers = [f"BALCONYCONTENT{nonce}N{i}E" for i in range(len(messages))]
        rendered = self.render([{**m, "content": markers[i]} for i, m in enumerate(messages)])
        pieces = re.split(f"BALCONYCONTENT{nonce}N(\\d+)E", rendered)  # template, index, template, index, ...
        # Segments: ("special", id) for the template's control tokens, ("text", str) for the rest (content included).
        segments: list[tuple[str, Any]] = []
        for k, piece in enumerate(pieces):
            if k % 2:
                segments.append(("text", messages[int(piece)]["content"]))
                continue
            at = 0
            for m in self._pattern.finditer(piece):
                segments.append(("text", piece[at:m.start()]))
                segments.append(("special", self.specials[m.group()]))
                at = m.end()
            segments.append(("text", piece[at:]))
        ids: list[int] = []
        pending = ""
        for kind, value in segments:  # text between two control tokens is tokenised as one string, as usual
            if kind == "text":
                pending += value
                continue
            ids += self._text_ids(pending) if pending else []
            ids.append(value)
            pending = ""
        return ids + (self._text_ids(pending) if pending else [])

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _text_ids(self, text: str) -> list[int]:
        return list(self.text_tokenizer(text, add_special_tokens=False)["input_ids"])
