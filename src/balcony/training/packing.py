"""Token rows: `PackedData` and `tokenize_and_pack`, which cuts documents into fixed-length rows with positions that restart per document."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "balcony-packed-v1"  # marks PackedData files, so a random .safetensors is not misread
IGNORE_INDEX = -100  # the label value HF losses skip


def _check_int(name: str, value: Any, *, minimum: int | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    # bool is an int subclass; True as a seq_len is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an integer{bound}{' or None' if optional else ''}, got {value!r}")


@dataclass
class PackedData:
    """Fixed-length token rows, kept compactly (int32) and returned as int64 batches.

    Args:
        input_ids: (N, seq_len) token ids.
        position_ids: (N, seq_len) positions; restart at 0 at each document and row start.
        attention_mask: (N, seq_len) bool, True for real tokens; None for packed
            rows, which have no padding (and must not pass a mask, see
            `tokenize_and_pack`).
        metadata: Free-form strings saved with the data (e.g. a cache fingerprint).

    Indexing returns a dict of int64 tensors: ``input_ids``, ``position_ids``,
    ``labels`` (``input_ids`` with -100 at every position 0 and on padding, so
    no label asks a row to predict a new document from the previous one), and
    ``attention_mask`` for unpacked rows.

    Example:
        >>> data = PackedData(torch.zeros(4, 8, dtype=torch.int32), torch.arange(8).repeat(4, 1))
        >>> len(data), data[0]["input_ids"].shape, data[torch.tensor([0, 2])]["labels"].shape
        (4, torch.Size([8]), torch.Size([2, 8]))
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (rows, seq_len), got shape {tuple(self.input_ids.shape)}")
        for name in ("position_ids", "attention_mask"):
            t = getattr(self, name)
            if t is not None and t.shape != self.input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, input_ids has {tuple(self.input_ids.shape)}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int | slice | torch.Tensor) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index].long()
        pos = self.position_ids[index].long()
        unlabelled = pos == 0
        out = {"input_ids": ids, "position_ids": pos}
        if self.attention_mask is not None:
            mask = self.attention_mask[index]
            unlabelled |= ~mask
            out["attention_mask"] = mask.long()
        out["labels"] = ids.masked_fill(unlabelled, IGNORE_INDEX)
        return out

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def packed(self) -> bool:
        return self.attention_mask is None

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return self.input_ids.numel() if self.attention_mask is None else int(self.attention_mask.sum())

    def split(self, eval_rows: int) -> tuple[PackedData, PackedData]:
        """Hold out the last ``eval_rows`` rows: returns ``(train, eval)``.

        The held-out rows are a contiguous tail rather than a random sample:
        neighbouring packed rows share documents, so a random pick would put
        halves of the same document on both sides.
        """
        if isinstance(eval_rows, bool) or not isinstance(eval_rows, int) or not 0 < eval_rows < len(self):
            raise ValueError(f"eval_rows must be an integer in [1, {len(self) - 1}] for {len(self)} rows, got {eval_rows!r}")
        cut = len(self) - eval_rows
        return self._rows(slice(None, cut)), self._rows(slice(cut, None))

    def _rows(self, rows: slice) -> PackedData:
        mask = None if self.attention_mask is None else self.attention_mask[rows]
        return PackedData(self.input_ids[rows], self.position_ids[rows], mask, dict(self.metadata))

    def save(self, path: str | os.PathLike) -> None:
        """Write to a safetensors file (atomically, so a killed run leaves no half file)."""
        tensors = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.attention_mask is not None:
            tensors["attention_mask"] = self.attention_mask
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={**self.metadata, "format": FORMAT})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PackedData:
        """Read a file written by `save`."""
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            if metadata.pop("format", None) != FORMAT:
                raise ValueError(f"{os.fspath(path)!r} is not a balcony PackedData file (no format={FORMAT!r} in its metadata)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(tensors["input_ids"], tensors["position_ids"], tensors.get("attention_mask"), metadata)


def tokenize_and_pack(
    texts: Iterable[str] | datasets.Dataset | datasets.IterableDataset,
    tokenizer: Any,
    seq_len: int,
    *,
    pack: bool = True,
    max_tokens: int | None = None,
    add_eos: bool = True,
    add_special_tokens: bool = True,
    max_positions: int | None = None,
    text_field: str = "text",
    batch_size: int = 1000,
) -> PackedData:
    """Tokenise documents and cut them into rows of exactly ``seq_len`` tokens.

    Each document is tokenised (with the tokenizer's own special tokens, e.g. a
    BOS, unless ``add_special_tokens=False``) and followed by EOS. Empty and
    whitespace-only documents are skipped. Tokenisation runs in batches of
    ``batch_size`` documents; a fast tokenizer encodes each batch on all cores.

    Packed (``pack=True``): documents are concatenated and the stream is cut
    into rows; the tail shorter than ``seq_len`` is dropped. ``position_ids``
    restart at 0 at every document start, and at every row start (a document
    cut by a row boundary continues in the next row as if it began there).
    How documents see each other then depends on how the batch reaches the model:

    * Pass ``position_ids`` and no ``attention_mask`` (and no KV cache). Then
      flash-attention runs variable-length attention per document, and in
      transformers 5 ``masking_utils.create_causal_mask`` also detects the
      packed documents from the position resets and builds a block-diagonal
      causal mask for SDPA/eager/flex attention (on CPU too): no document
      attends to another. `BalconyModel.distill_forward` works this way.
    * Pass an ``attention_mask`` (even all ones) or a cache, and the detection
      is off: SDPA/eager attention is plain causal over the concatenation, the
      classic "concatenate with EOS" recipe, with positions still per document.

    Unpacked (``pack=False``): every document gets its own row, truncated to
    ``seq_len`` or right-padded (pad token, else EOS) with an ``attention_mask``.

    Labels (from indexing the result) are ``input_ids`` with -100 where
    ``position_ids == 0`` and on padding, so no label crosses a document boundary.

    Args:
        texts: Strings, or a (streaming) dataset with a ``text_field`` column.
        tokenizer: A Hugging Face tokenizer.
        seq_len: Tokens per row.
        pack: Pack documents (True) or pad each to its own row (False).
        max_tokens: Stop after this many tokens (counting EOS, not padding).
        add_eos: Append EOS to each document (unless it already ends with one).
        add_special_tokens: Let the tokenizer add its special tokens (False for
            chat-template text, which already has them).
        max_positions: The model's context length; ``seq_len`` may not exceed it.
        text_field: Column to read when ``texts`` is a dataset.
        batch_size: Documents per tokenizer call.

    Returns:
        The rows as `PackedData`.

    Raises:
        ValueError: ``seq_len`` exceeds ``max_positions``, the tokenizer has no
            EOS while ``add_eos``, or there are too few tokens for one row.

    Example:
        >>> data = tokenize_and_pack(["one document", "another one"], tokenizer, seq_len=8)  # doctest: +SKIP
        >>> data[0]["position_ids"]  # doctest: +SKIP
        tensor([0, 1, 2, 3, 4, 5, 6, 7])
    """
    _check_int("seq_len", seq_len, minimum=1)
    _check_int("max_tokens", max_tokens, minimum=1, optional=True)
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(f"seq_len={seq_len} exceeds the model's maximum context of {max_positions} positions")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("add_eos=True but the tokenizer has no eos_token_id; set tokenizer.eos_token or pass add_eos=False")

    flat_parts: list[np.ndarray] = []
    length_parts: list[np.ndarray] = []
    total = 0
    for docs in _encoded_batches(texts, tokenizer, text_field, batch_size, add_special_tokens, eos if add_eos else None):
        if not pack:
            docs = [ids[:seq_len] for ids in docs]
        lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int32, count=int(lengths.sum()))
        if max_tokens is not None and total + len(flat) >= max_tokens:
            # Keep exactly max_tokens: cut the stream, shortening the document it lands in.
            keep = max_tokens - total
            ends = np.cumsum(lengths)
            n_docs = int(np.searchsorted(ends, keep)) + 1
            lengths = lengths[:n_docs].copy()
            lengths[-1] -= ends[n_docs - 1] - keep
            flat_parts.append(flat[:keep])
            length_parts.append(lengths)
            break
        flat_parts.append(flat)
        length_parts.append(lengths)
        total += len(flat)

    ids = np.concatenate(flat_parts) if flat_parts else np.zeros(0, dtype=np.int32)
    lengths = np.concatenate(length_parts) if length_parts else np.zeros(0, dtype=np.int64)
    lengths = lengths[lengths > 0]
    if pack:
        return _pack(ids, lengths, seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    return _pad(ids, lengths, seq_len, pad)


def _encoded_batches(
    texts: Iterable[str] | datasets.Dataset | datasets.IterableDataset,
    tokenizer: Any,
    text_field: str,
    batch_size: int,
    add_special_tokens: bool,
    eos: int | None,
) -> Iterator[list[list[int]]]:
    """Token ids of the non-empty documents, one list per batch of documents."""
    for batch in _text_batches(texts, text_field, batch_size):
        bad = next((t for t in batch if t is not None and not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"documents must be strings, got a {type(bad).__name__}: {str(bad)[:100]} (for chat data set messages_field)")
        batch = [t for t in batch if t and not t.isspace()]
        if not batch:
            continue
        # verbose=False: documents longer than the model context are fine here, they get cut into rows.
        encoded = tokenizer(
            batch, add_special_tokens=add_special_tokens, return_attention_mask=False, return_token_type_ids=False, verbose=False
        )["input_ids"]
        if eos is not None:
            encoded = [ids if ids and ids[-1] == eos else ids + [eos] for ids in encoded]
        yield encoded


def _text_batches(texts: Any, text_field: str, batch_size: int) -> Iterator[list[str]]:
    if isinstance(texts, str):
        raise TypeError("texts must be a collection of documents, not a single string; wrap it in a list")
    if isinstance(texts, (datasets.Dataset, datasets.IterableDataset)):
        if texts.column_names is not None and text_field not in texts.column_names:
            raise ValueError(f"text field {text_field!r} not found; the dataset's columns are {texts.column_names}")
        if isinstance(texts, datasets.Dataset):
            texts = texts.select_columns([text_field])  # do not decode the other columns
        for batch in texts.iter(batch_size=batch_size):
            yield batch[text_field]
        return
    it = iter(texts)
    while batch := list(itertools.islice(it, batch_size)):
        yield batch


def _pack(ids: np.ndarray, lengths: np.ndarray, seq_len: int) -> PackedData:
    rows = len(ids) // seq_len
    if rows == 0:
        raise ValueError(
            f"packing found {len(ids)} tokens in {len(lengths)} documents, but one row needs seq_len={seq_len}; "
            "use more data, a larger max_tokens or a smaller seq_len"
        )
    used = rows * seq_len
    starts = np.cumsum(lengths) - lengths
    is_start = np.zeros(used, dtype=bool)
    is_start[starts[starts < used]] = True
    is_start[::seq_len] = True
    # Position = distance to the latest document or row start.
    index = np.arange(used)
    positions = index - np.maximum.accumulate(np.where(is_start, index, 0))
    return PackedData(
        torch.from_numpy(ids[:used].reshape(rows, seq_len).copy()),
        torch.from_numpy(positions.reshape(rows, seq_len).astype(np.int32)),
    )


def _pad(ids: np.ndarray, lengths: np.ndarray, seq_len: int, pad_id: int) -> PackedData:
    rows = len(lengths)
    if rows == 0:
        raise ValueError("found no non-empty documents to tokenise")
    row = np.repeat(np.arange(rows), lengths)
    col = np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    input_ids = np.full((rows, seq_len), pad_id, dtype=np.int32)
    mask = np.zeros((rows, seq_len), dtype=bool)
    input_ids[row, col] = ids
    mask[row, col] = True
    positions = torch.arange(seq_len, dtype=torch.int32).expand(rows, seq_len).contiguous()
    return PackedData(torch.from_numpy(input_ids), positions, torch.from_numpy(mask))
