"""Reading documents: Hub datasets and local txt / jsonl / parquet files, one text (or chat) column."""

from __future__ import annotations

import glob
import os
from typing import TYPE_CHECKING, Any

import datasets

if TYPE_CHECKING:
    from .data import DataConfig


# Local file suffix -> the `datasets` builder that reads it.
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


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
