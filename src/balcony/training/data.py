"""Training data: a corpus (Hub dataset or local files) turned into fixed-length token rows, in a resumable order.

The exits are trained by self-distillation on plain text, so the data pipeline
only has to turn a corpus into rows of ``seq_len`` token ids, and hand them out
in a seeded, resumable order:

    cfg = DataConfig(dataset="HuggingFaceTB/cosmopedia-100k", seq_len=512, max_tokens=20_000_000)
    train, held_out = prepare_data(cfg, tokenizer, max_positions=model.config.max_position_embeddings)
    for batch in iterate_batches(train, batch_size=8, seed=cfg.seed, epoch=0):
        ...  # batch["input_ids"], batch["position_ids"], batch["labels"]: (8, 512)

Reading documents is `balcony.training.sources`, cutting them into rows
`balcony.training.packing`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from .packing import PackedData, _check_int, tokenize_and_pack
from .sources import _local_files, chat_to_text, load_texts


@dataclass
class DataConfig:
    """Where the training text comes from and how it is cut into rows.

    Args:
        dataset: A Hub dataset id (``"HuggingFaceTB/cosmopedia-100k"``) or a local
            path: a ``.txt``/``.jsonl``/``.json``/``.parquet`` file, a directory of
            such files (searched recursively, sorted) or a glob (``"data/*.jsonl"``).
        config_name: The Hub dataset's configuration (subset), if it has several.
        split: Split to read. Local files have only ``"train"`` (slices such as
            ``"train[:10%]"`` work when not streaming).
        text_field: Column holding the documents' text.
        messages_field: Column holding chat conversations (lists of
            ``{"role", "content"}`` dicts), rendered with the tokenizer's chat
            template. When set it is used instead of ``text_field``.
        streaming: Read the dataset lazily (no full download); stops at ``max_tokens``.
        seq_len: Tokens per row.
        max_tokens: Stop tokenising after this many tokens (train + held-out).
        eval_fraction: Fraction of rows held out for evaluation (the last rows).
        eval_tokens: Tokens held out for evaluation, rounded up to whole rows.
            At most one of ``eval_fraction`` and ``eval_tokens``.
        pack: Concatenate documents into full rows (True) or give every
            document its own padded, truncated row (False).
        seed: Seed of the batch order (see `iterate_batches`).
        num_proc: Processes `datasets` may use to prepare a downloaded dataset.

    Example:
        >>> DataConfig(dataset="corpus.txt", seq_len=128).pack
        True
    """

    dataset: str | None = None
    config_name: str | None = None
    split: str = "train"
    text_field: str = "text"
    messages_field: str | None = None
    streaming: bool = False
    seq_len: int = 256
    max_tokens: int | None = None
    eval_fraction: float | None = None
    eval_tokens: int | None = None
    pack: bool = True
    seed: int = 0
    num_proc: int | None = None

    def __post_init__(self) -> None:
        for name in ("dataset", "config_name", "messages_field"):
            _check_str(name, getattr(self, name), optional=True)
        for name in ("split", "text_field"):
            _check_str(name, getattr(self, name), optional=False)
        for name in ("streaming", "pack"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _check_int("seq_len", self.seq_len, minimum=1)
        _check_int("max_tokens", self.max_tokens, minimum=1, optional=True)
        _check_int("eval_tokens", self.eval_tokens, minimum=1, optional=True)
        _check_int("num_proc", self.num_proc, minimum=1, optional=True)
        _check_int("seed", self.seed)
        if self.eval_fraction is not None:
            if isinstance(self.eval_fraction, bool) or not isinstance(self.eval_fraction, (int, float)) or not 0 < self.eval_fraction < 1:
                raise ValueError(f"eval_fraction must be a number strictly between 0 and 1 (or None), got {self.eval_fraction!r}")
            if self.eval_tokens is not None:
                raise ValueError(
                    f"give at most one of eval_fraction ({self.eval_fraction!r}) and eval_tokens ({self.eval_tokens!r})"
                )

    def eval_rows(self, num_rows: int) -> int:
        """How many of ``num_rows`` rows to hold out (0 when no held-out slice is asked for)."""
        if self.eval_tokens is not None:
            return math.ceil(self.eval_tokens / self.seq_len)
        if self.eval_fraction is not None:
            return max(1, round(self.eval_fraction * num_rows))
        return 0


def _check_str(name: str, value: Any, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        accepted = "a non-empty string or None" if optional else "a non-empty string"
        raise ValueError(f"{name} must be {accepted}, got {value!r}")



def prepare_data(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    max_positions: int | None = None,
    cache_path: str | os.PathLike | None = None,
) -> tuple[PackedData, PackedData | None]:
    """Load, tokenise, pack and split the corpus ``cfg`` names, with an optional cache.

    With ``cache_path``, a file written by an earlier call is reused when its
    fingerprint (the config fields that shape the tokens, the tokenizer, and
    the local files' sizes and times) matches; otherwise it is rebuilt and
    overwritten. A Hub dataset's revision is not part of the fingerprint.

    Args:
        cfg: The data config.
        tokenizer: The base model's tokenizer.
        max_positions: The model's context length, checked against ``cfg.seq_len``.
        cache_path: A ``.safetensors`` file to read from / write to.

    Returns:
        ``(train, eval)``; ``eval`` is None without ``eval_fraction``/``eval_tokens``.

    Example:
        >>> train, held_out = prepare_data(DataConfig(dataset="corpus.jsonl", eval_fraction=0.05), tokenizer)  # doctest: +SKIP
    """
    if max_positions is not None and cfg.seq_len > max_positions:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's maximum context of {max_positions} positions")
    data = None
    fingerprint = _fingerprint(cfg, tokenizer)
    if cache_path is not None and os.path.exists(cache_path):
        cached = PackedData.load(cache_path)
        if cached.metadata.get("fingerprint") == fingerprint:
            data = cached
    if data is None:
        ds = load_texts(cfg)
        chat = cfg.messages_field is not None
        texts = (chat_to_text(m, tokenizer) for m in _column(ds, cfg.messages_field)) if chat else ds
        data = tokenize_and_pack(
            texts,
            tokenizer,
            cfg.seq_len,
            pack=cfg.pack,
            max_tokens=cfg.max_tokens,
            add_special_tokens=not chat,
            max_positions=max_positions,
            text_field=cfg.text_field,
        )
        data.metadata["fingerprint"] = fingerprint
        if cache_path is not None:
            data.save(cache_path)
    eval_rows = cfg.eval_rows(len(data))
    if eval_rows == 0:
        return data, None
    if eval_rows >= len(data):
        raise ValueError(f"the held-out slice takes {eval_rows} rows but there are only {len(data)}; lower eval_fraction/eval_tokens")
    return data.split(eval_rows)


def _column(ds: datasets.Dataset | datasets.IterableDataset, name: str) -> Iterator[Any]:
    for batch in ds.iter(batch_size=1000):
        yield from batch[name]


def _fingerprint(cfg: DataConfig, tokenizer: Any) -> str:
    shaping = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("seed", "num_proc", "eval_fraction", "eval_tokens")}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    files = _local_files(cfg.dataset) if cfg.dataset is not None else None
    state = {
        "config": shaping,
        "tokenizer": backend.to_str() if backend is not None else [getattr(tokenizer, "name_or_path", ""), len(tokenizer)],
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None) if cfg.messages_field else None,
        "files": [[f, os.path.getsize(f), os.path.getmtime(f)] for f in files or []],
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:32]


def batches_per_epoch(data: Sized, batch_size: int, *, drop_last: bool = True) -> int:
    """Batches `iterate_batches` yields per epoch.

    Example:
        >>> batches_per_epoch(range(10), 4), batches_per_epoch(range(10), 4, drop_last=False)
        (2, 3)
    """
    _check_int("batch_size", batch_size, minimum=1)
    return len(data) // batch_size if drop_last else math.ceil(len(data) / batch_size)


def epoch_order(num_rows: int, *, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled row order of one epoch; batch k of the epoch is ``order[k*B:(k+1)*B]``.

    One generator per (seed, epoch): the order of epoch e never depends on having
    drawn epochs 0..e-1, which is what makes resuming exact.
    """
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    return torch.randperm(num_rows, generator=generator)


def iterate_batches(
    data: PackedData,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_step: int = 0,
    drop_last: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield one epoch of shuffled batches, reproducibly and resumably.

    The row order depends only on ``(seed, epoch)`` (a seeded
    `torch.Generator`, independent of the global RNG), so a run killed at step
    ``k`` of an epoch resumes with ``start_step=k`` and sees exactly the
    batches it would have seen.

    Args:
        data: The rows.
        batch_size: Rows per batch.
        seed: Base seed of the order.
        epoch: Epoch number; each epoch has its own order.
        start_step: Batches of this epoch to skip (already trained on).
        drop_last: Drop the last, smaller batch (keeps shapes fixed).

    Yields:
        ``data[rows]`` for each batch: dicts of (batch_size, seq_len) int64 tensors.

    Example:
        >>> for batch in iterate_batches(train, 8, seed=0, epoch=1, start_step=100):  # doctest: +SKIP
        ...     loss = step(batch)
    """
    n_batches = batches_per_epoch(data, batch_size, drop_last=drop_last)
    if n_batches == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {len(data)} rows, so there is no full batch")
    _check_int("seed", seed)
    _check_int("epoch", epoch, minimum=0)
    if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step <= n_batches:
        raise ValueError(f"start_step must be an integer in [0, {n_batches}] (batches per epoch), got {start_step!r}")
    order = epoch_order(len(data), seed=seed, epoch=epoch)
    for step in range(start_step, n_batches):
        yield data[order[step * batch_size : (step + 1) * batch_size]]
