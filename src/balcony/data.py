"""Training data: text corpora turned into fixed-length token rows.

The exits are trained by self-distillation on plain text, so the data pipeline
only has to turn a corpus (a Hugging Face Hub dataset or local files) into rows
of ``seq_len`` token ids, and hand them out in a seeded, resumable order:

    cfg = DataConfig(dataset="HuggingFaceTB/cosmopedia-100k", seq_len=512, max_tokens=20_000_000)
    train, held_out = prepare_data(cfg, tokenizer, max_positions=model.config.max_position_embeddings)
    for batch in iterate_batches(train, batch_size=8, seed=cfg.seed, epoch=0):
        ...  # batch["input_ids"], batch["position_ids"], batch["labels"]: (8, 512)

Packed rows carry ``position_ids`` that restart at 0 at every document start,
which is what lets the attention keep documents apart (see `tokenize_and_pack`).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

# Local file suffix -> the `datasets` builder that reads it.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
FORMAT = "balcony-packed-v1"  # marks PackedData files, so a random .safetensors is not misread
IGNORE_INDEX = -100  # the label value HF losses skip


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


def _check_int(name: str, value: Any, *, minimum: int | None = None, optional: bool = False) -> None:
    if value is None and optional:
        return
    # bool is an int subclass; True as a seq_len is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{name} must be an integer{bound}{' or None' if optional else ''}, got {value!r}")


# --------------------------------------------------------------------------- loading


def load_texts(cfg: DataConfig) -> datasets.Dataset | datasets.IterableDataset:
    """Load the documents named by ``cfg`` as a dataset with one text (or messages) column.

    Local ``.txt`` files hold one document per paragraph: documents are separated
    by a blank line (``"\\n\\n"``), stripped, and whitespace-only ones are
    dropped. ``.jsonl``/``.json`` (one object per line, or a list) and
    ``.parquet`` files are read with the matching `datasets` builder; a
    directory or glob reads all its supported files in sorted order (they must
    share one format). Anything that is not an existing path and does not look
    like one is a Hub id, read with `datasets.load_dataset`.

    Args:
        cfg: The data config; uses ``dataset``, ``config_name``, ``split``,
            ``text_field``/``messages_field``, ``streaming`` and ``num_proc``.

    Returns:
        A `datasets.Dataset` (an `IterableDataset` when streaming) whose only
        column is ``cfg.messages_field`` if set, else ``cfg.text_field``.

    Raises:
        FileNotFoundError: The path (or Hub id) does not exist.
        ValueError: The column is missing (the error lists the columns there
            are), the dataset is empty, or the files mix formats.

    Example:
        >>> ds = load_texts(DataConfig(dataset="notes.txt"))  # doctest: +SKIP
        >>> ds[0]["text"]  # doctest: +SKIP
        'The first paragraph.'
    """
    if cfg.dataset is None:
        raise ValueError('DataConfig.dataset is not set: give a Hub id (e.g. "HuggingFaceTB/cosmopedia-100k") or a local path')
    files = _local_files(cfg.dataset)
    if files is None:
        ds = _load_hub(cfg)
        where = f"Hub dataset {cfg.dataset!r} (split {cfg.split!r})"
    else:
        ds = _load_files(files, cfg)
        where = repr(cfg.dataset)
    return _select_field(ds, cfg.messages_field or cfg.text_field, where, kind="messages" if cfg.messages_field else "text")


def _local_files(spec: str) -> list[str] | None:
    """The supported files ``spec`` names, or None when it is a Hub id."""
    path = os.path.expanduser(spec)
    if any(c in spec for c in "*?["):
        found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(path):
        found = []
        for root, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # skip .cache/.git of downloaded snapshots
            found += [os.path.join(root, n) for n in names if not n.startswith(".")]
        found.sort()
    elif os.path.isfile(path):
        if _suffix(path) not in BUILDERS:
            raise ValueError(f"dataset file {spec!r} has an unsupported type; supported: {', '.join(BUILDERS)}")
        return [path]
    elif _looks_like_path(spec):
        raise FileNotFoundError(f"dataset path {spec!r} does not exist")
    else:
        return None
    files = [f for f in found if _suffix(f) in BUILDERS]
    if not files:
        raise FileNotFoundError(f"dataset {spec!r} holds no {'/'.join(BUILDERS)} files (found {len(found)} other files)")
    return files


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _looks_like_path(spec: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that is not on disk is a typo'd path.
    return spec.startswith((".", "/", "~")) or "\\" in spec or _suffix(spec) in BUILDERS or spec.count("/") > 1


def _load_files(files: list[str], cfg: DataConfig) -> datasets.Dataset | datasets.IterableDataset:
    if cfg.split.split("[")[0] != "train":
        raise ValueError(f"local files have a single split 'train' (slices like 'train[:10%]' work), got split={cfg.split!r}")
    if cfg.config_name is not None:
        raise ValueError(f"config_name={cfg.config_name!r} applies to Hub datasets only, but {cfg.dataset!r} is local")
    builders = {BUILDERS[_suffix(f)] for f in files}
    if len(builders) > 1:
        raise ValueError(f"dataset {cfg.dataset!r} mixes file formats ({', '.join(sorted(builders))}); use one format")
    # datasets' builders fail obscurely on empty files, and they hold no documents anyway.
    files = [f for f in files if os.path.getsize(f) > 0]
    if not files:
        raise ValueError(f"dataset {cfg.dataset!r} is empty: its files have no content")
    builder = builders.pop()
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    if not cfg.streaming and cfg.num_proc is not None:
        kwargs["num_proc"] = cfg.num_proc
    try:
        ds = datasets.load_dataset(builder, data_files={"train": files}, split=cfg.split, streaming=cfg.streaming, **kwargs)
    except ValueError as err:
        if "corresponds to no data" not in str(err):  # datasets' words for "the files hold no rows"
            raise
        raise ValueError(f"dataset {cfg.dataset!r} is empty: its files hold no rows") from err
    if builder == "text":
        # Paragraph splitting keeps stray newlines and whitespace-only blocks; clean them here so
        # documents are exactly the blank-line-separated blocks.
        ds = ds.map(_strip_paragraphs, batched=True, remove_columns=["text"])
        if cfg.text_field != "text":
            ds = ds.rename_column("text", cfg.text_field)
    return ds


def _strip_paragraphs(batch: dict[str, list[str]]) -> dict[str, list[str]]:
    return {"text": [s for s in (t.strip() for t in batch["text"]) if s]}


def _load_hub(cfg: DataConfig) -> datasets.Dataset | datasets.IterableDataset:
    kwargs: dict[str, Any] = {"num_proc": cfg.num_proc} if cfg.num_proc is not None and not cfg.streaming else {}
    try:
        return datasets.load_dataset(cfg.dataset, cfg.config_name, split=cfg.split, streaming=cfg.streaming, **kwargs)
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as err:
        raise FileNotFoundError(
            f"dataset {cfg.dataset!r} is not a local file or directory, and the Hugging Face Hub has no such dataset ({err})"
        ) from err


def _select_field(
    ds: datasets.Dataset | datasets.IterableDataset, name: str, where: str, kind: str
) -> datasets.Dataset | datasets.IterableDataset:
    first = None
    if isinstance(ds, datasets.IterableDataset):
        # A stream may not know its columns or length up front; its first row tells both.
        first = next(iter(ds), None)
        empty = first is None
    else:
        empty = len(ds) == 0
    columns = ds.column_names or (list(first) if first is not None else [])
    if empty:
        raise ValueError(f"dataset {where} is empty: it has no documents")
    if name not in columns:
        hint = "" if kind == "messages" else " (for chat data set messages_field)"
        raise ValueError(f"{kind} field {name!r} not found in dataset {where}; its columns are {columns}{hint}")
    return ds.select_columns([name])


def chat_to_text(messages: list[dict[str, Any]], tokenizer: Any) -> str:
    """Render one conversation as text with the tokenizer's chat template.

    Tokenise the result with ``add_special_tokens=False``: the template
    already writes the special tokens the model expects (a BOS, if any).

    Args:
        messages: ``[{"role": "user", "content": "..."}, ...]``.
        tokenizer: A Hugging Face tokenizer with a ``chat_template``.

    Returns:
        The rendered conversation.

    Example:
        >>> chat_to_text([{"role": "user", "content": "hi"}], tokenizer)  # doctest: +SKIP
        '<|im_start|>user\\nhi<|im_end|>\\n'
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template, so chat messages cannot be rendered; use text_field for plain text")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError(f"chat messages must be a list of {{'role', 'content'}} dicts, got {str(messages)[:200]}")
    return tokenizer.apply_chat_template(messages, tokenize=False)


# --------------------------------------------------------------------------- packed rows


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


# --------------------------------------------------------------------------- config -> rows


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


# --------------------------------------------------------------------------- batches


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
