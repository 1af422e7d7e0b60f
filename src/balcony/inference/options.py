"""`DecodeOptions`, `DraftOptions` and `ExitPolicy`: how to decode, how to draft, where tokens exit, each named once.

Every decoding entry point (`engine.generate`, `engine.generate_stream`,
`speculative.speculative_generate`, `speculative.speculative_stream` and
`BalconyModel.generate`) takes ``options=`` / ``draft=`` objects, or the same
fields as keyword arguments (``max_new_tokens=16, do_sample=True``), which
`resolve_options` merges into them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .sampling import SamplingConfig


def _positive_int(name: str, value: Any, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1 ({what})")


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode: length, sampling and stopping.

    Args:
        max_new_tokens: How many tokens to add at most (>= 1).
        do_sample: Sample instead of greedy decoding.
        temperature: Softmax temperature (> 0) when sampling.
        top_k: Sample among the k most likely tokens (None or 0: all).
        top_p: Nucleus mass in (0, 1].
        eos_token_id: Stop a sequence at this token (or any of these).
        pad_token_id: What a finished sequence is filled with (default: the first EOS id).
        stop_strings: Stop a sequence once its output contains one of these (needs `tokenizer`).
        tokenizer: Decodes the output for `stop_strings`.
        generator: Seeded `torch.Generator` for reproducible sampling (on the model's device).
        compile: Run the decode step through `torch.compile` (True, or a backend name).
        prefill_chunk: Run the prompt through the model this many positions at a time (None: in one
            pass). Chunks give the same tokens; between them `generate_stream`'s `cancel` is checked,
            and the attention scores of a long prompt stay (B, heads, chunk, T) instead of (B, heads, T, T).

    Example:
        >>> DecodeOptions(max_new_tokens=16, do_sample=True, top_p=0.9).sampling.top_p
        0.9
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None
    stop_strings: str | Sequence[str] | None = None
    tokenizer: Any = None
    generator: torch.Generator | None = None
    compile: bool | str = False
    prefill_chunk: int | None = None

    def __post_init__(self) -> None:
        _positive_int("max_new_tokens", self.max_new_tokens, "tokens to add")
        if self.prefill_chunk is not None:
            _positive_int("prefill_chunk", self.prefill_chunk, "prompt positions per prefill pass; None: one pass")
        self.sampling  # validates temperature, top_k, top_p

    @property
    def sampling(self) -> SamplingConfig:
        """The sampling part, as `balcony.inference.sampling` takes it."""
        return SamplingConfig(self.do_sample, self.temperature, self.top_k, self.top_p)

    @property
    def eos_ids(self) -> list[int]:
        """`eos_token_id` as a list."""
        e = self.eos_token_id
        return [e] if isinstance(e, int) else list(e or [])

    @property
    def fill_token(self) -> int:
        """What finished sequences emit: `pad_token_id`, else the first EOS id, else 0."""
        eos = self.eos_ids
        return self.pad_token_id if self.pad_token_id is not None else (eos[0] if eos else 0)

    def replace(self, **changes: Any) -> "DecodeOptions":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class DraftOptions:
    """How self-speculative decoding drafts (see `balcony.inference.speculative`).

    Args:
        draft_length: Most tokens drafted per verify pass (>= 1).
        draft_threshold: Stop a draft once the exit's top-1 probability falls below this (None: never).
        draft_vocab: Draft among the first this many token ids only, a cheaper draft head (None: all).
        draft_width: Candidates drafted for the next position, verified side by side
            (greedy with draft_length=1 only).

    Example:
        >>> DraftOptions(draft_length=1, draft_threshold=0.4).draft_threshold
        0.4
    """

    draft_length: int = 4
    draft_threshold: float | None = None
    draft_vocab: int | None = None
    draft_width: int = 1

    def __post_init__(self) -> None:
        _positive_int("draft_length", self.draft_length, "tokens drafted per verify pass")
        if self.draft_threshold is not None and not 0.0 <= self.draft_threshold < 1.0:
            raise ValueError(f"draft_threshold={self.draft_threshold!r} must be in [0, 1) or None")
        if self.draft_vocab is not None:
            _positive_int("draft_vocab", self.draft_vocab, "draft among the first token ids; None: all")
        _positive_int("draft_width", self.draft_width, "candidates drafted per position")

    def check(self, options: DecodeOptions) -> None:
        """Refuse combinations that cannot run together."""
        if self.draft_width > 1 and (options.do_sample or self.draft_length != 1):
            raise ValueError(
                f"draft_width={self.draft_width} drafts several candidates for one position: it needs greedy decoding "
                f"and draft_length=1 (got do_sample={options.do_sample}, draft_length={self.draft_length})"
            )


@dataclass(frozen=True)
class ExitPolicy:
    """Token-level exits (``exit="auto"``): each token leaves at the first exit confident enough.

    The confidence of an exit is the top-1 probability of its next-token distribution, scored over the
    first `confidence_vocab` token ids when set (a head that many times cheaper to check; BPE
    vocabularies list frequent tokens first). A token leaves at exit j when that confidence is strictly
    above `threshold`, so 0 always leaves at the first exit (budget S's output) and 1 never leaves early
    (the full model's output).

    Args:
        threshold: In [0, 1].
        exits: The exits that may stop a token (names or layers; default every exit below the full model).
        confidence_vocab: Score confidence over the first this many ids (None: the whole vocabulary).

    Example:
        >>> ExitPolicy(threshold=0.7, confidence_vocab=8192).threshold
        0.7
    """

    threshold: float = 0.9
    exits: tuple[int | str, ...] | None = None
    confidence_vocab: int | None = None

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"threshold={t!r} must be a number in [0, 1] (0: leave at the first exit, 1: never leave early)")
        if self.confidence_vocab is not None:
            _positive_int("confidence_vocab", self.confidence_vocab, "score confidence over the first token ids; None: all")
        if self.exits is not None:
            object.__setattr__(self, "exits", tuple(self.exits))
            if not self.exits:
                raise ValueError("exits=() leaves no exit to stop at: give at least one exit, or None for all")


DECODE_FIELDS = frozenset(f.name for f in dataclasses.fields(DecodeOptions))
DRAFT_FIELDS = frozenset(f.name for f in dataclasses.fields(DraftOptions))
POLICY_FIELDS = frozenset(f.name for f in dataclasses.fields(ExitPolicy))


def resolve_policy(policy: ExitPolicy | None, kwargs: dict[str, Any]) -> tuple[ExitPolicy, dict[str, Any]]:
    """Take the `ExitPolicy` fields out of `kwargs` and merge them into `policy`; returns (policy, the rest)."""
    mine = {k: kwargs[k] for k in POLICY_FIELDS if k in kwargs}
    rest = {k: v for k, v in kwargs.items() if k not in POLICY_FIELDS}
    policy = dataclasses.replace(policy or ExitPolicy(), **mine) if mine else (policy or ExitPolicy())
    return policy, rest


def resolve_options(
    options: DecodeOptions | None, kwargs: dict[str, Any], draft: DraftOptions | None = None, *, drafting: bool = False
) -> tuple[DecodeOptions, DraftOptions | None]:
    """Merge keyword arguments into `options` (and `draft` when `drafting`).

    Raises:
        TypeError: a keyword that is no option, naming it and the accepted ones.

    Example:
        >>> resolve_options(None, {"max_new_tokens": 4})[0].max_new_tokens
        4
    """
    known = DECODE_FIELDS | (DRAFT_FIELDS if drafting else frozenset())
    unknown = sorted(set(kwargs) - known)
    if unknown:
        hint = "" if drafting or not set(unknown) & DRAFT_FIELDS else " (draft options need speculative decoding)"
        if set(unknown) & POLICY_FIELDS:
            hint += " (threshold, exits and confidence_vocab need token-level exits: exit='auto')"
        raise TypeError(f"unexpected decoding option(s) {unknown}{hint}; accepted: {', '.join(sorted(known))}")
    dec = {k: v for k, v in kwargs.items() if k in DECODE_FIELDS}
    options = (options or DecodeOptions()).replace(**dec) if dec else (options or DecodeOptions())
    if drafting:
        dr = {k: v for k, v in kwargs.items() if k in DRAFT_FIELDS}
        draft = dataclasses.replace(draft or DraftOptions(), **dr) if dr else (draft or DraftOptions())
    return options, draft
