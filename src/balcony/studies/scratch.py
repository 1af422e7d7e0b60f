"""The from-scratch model of Table 4: a small Llama-shaped base and a byte-level BPE tokenizer fitted to the corpus.

Pretraining from scratch on a CPU needs a model of a few million parameters, and a
vocabulary sized for it (the head is applied at every sub-model, so a 49k-entry
vocabulary would cost more than the layers). `build_scratch_base` fits a byte-level
BPE tokenizer to the training corpus and saves a randomly initialised Llama with it;
the ``pretrain`` recipe then draws fresh weights of that shape with the run's seed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from ..training.data import DataConfig
from ..training.sources import load_texts


@dataclass(frozen=True)
class ScratchSpec:
    """The shape of the from-scratch base.

    Attributes:
        layers: Decoder layers.
        hidden: Hidden size.
        heads: Attention heads (head size hidden / heads).
        kv_heads: Key/value heads (grouped-query attention).
        intermediate: MLP width.
        vocab: BPE vocabulary size (including the special tokens).
        max_positions: Context length.
    """

    layers: int = 8
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 768
    vocab: int = 4096
    max_positions: int = 1024

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"hidden={self.hidden} must divide by heads={self.heads}, and heads by kv_heads={self.kv_heads}")
        if self.vocab < 300:
            raise ValueError(f"vocab={self.vocab} must be >= 300 (256 bytes, special tokens and some merges)")


SPECIALS = ("<|endoftext|>", "<|pad|>")


def _texts(dataset: str, text_field: str) -> Iterator[str]:
    ds = load_texts(DataConfig(dataset=dataset, text_field=text_field))
    for row in ds:
        yield row[text_field]


def build_scratch_base(directory: str | os.PathLike, dataset: str, spec: ScratchSpec = ScratchSpec(), *, text_field: str = "text", seed: int = 0) -> Path:
    """Save a random Llama of shape `spec` and a BPE tokenizer fitted to `dataset` into `directory` (reused if there).

    Args:
        directory: Where to save (a loadable HF model folder).
        dataset: The training corpus (a local txt / jsonl / parquet file or folder).
        spec: The model's shape.
        text_field: The corpus's text column.
        seed: Seed of the (placeholder) weights; the pretrain recipe redraws them with its own seed.

    Returns:
        The directory.

    Raises:
        ValueError: the folder holds a base of another shape (the message names both).

    Example:
        >>> build_scratch_base("runs/scratch-base", "wikitext2/test.txt")  # doctest: +SKIP
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(directory)
    stamp = out / "scratch_spec.json"
    wanted = {**asdict(spec), "dataset": str(dataset), "text_field": text_field}
    if stamp.is_file():
        have = json.loads(stamp.read_text())
        if have != wanted:
            raise ValueError(f"{out} holds a from-scratch base built with {have}, not {wanted}: use another output folder")
        return out
    out.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(_texts(dataset, text_field), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=SPECIALS[0], bos_token=SPECIALS[0], pad_token=SPECIALS[1])
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    stamp.write_text(json.dumps(wanted, indent=2))
    return out
