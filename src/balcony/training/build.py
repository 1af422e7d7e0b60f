"""What a training run trains on: the base + exits as the recipe asks (base in its dtype, exits float32), and the token rows.

The frozen base is loaded straight in the dtype asked for (bf16 on a GPU: 16 GB for an 8B
model instead of 32, and no float32 copy in host memory), while the exits, their gradients and
the optimizer state stay float32: the master weights. Under bf16 autocast the exits' matmuls
still run in bf16.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from ..modeling.config import BalconyConfig
from ..modeling.loading import DEFAULT_EXITS, DEFAULT_MODEL, cache_dir, default_exit_layers, is_default, load_base
from ..modeling.model import BalconyModel
from .config import TrainConfig
from .data import DataConfig, prepare_data
from .packing import PackedData


def build_training_model(
    cfg: TrainConfig, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None, base: Any = None, tok: Any = None
) -> tuple[BalconyModel, Any]:
    """Base + exits as the recipe asks, with the right parameters trainable.

    Args:
        cfg: The run's config.
        dtype: The dtype the base is loaded in; trainable exits are float32 whatever it is.
        device: Where the base is loaded (an accelerator: straight onto it, never whole in host RAM).
        base, tok: An already built base (e.g. on the meta device, for `balcony.training.memory`)
            and its tokenizer, instead of loading `cfg.model`.

    Example:
        >>> model, tok = build_training_model(TrainConfig(), dtype=torch.bfloat16)  # doctest: +SKIP
        >>> next(model.base.parameters()).dtype, next(model.exits.parameters()).dtype  # doctest: +SKIP
        (torch.bfloat16, torch.float32)
    """
    if base is None:
        base, tok = load_base(cfg.model, dtype=dtype, device=device)
    if cfg.recipe == "pretrain":
        # Same architecture, fresh weights: pretraining the dynamic model from scratch.
        torch.manual_seed(cfg.seed)
        fresh = type(base)(base.config)
        fresh.config._name_or_path = f"{base.config._name_or_path} (from scratch)"
        base = fresh.to(dtype=dtype, device=next(base.parameters()).device).eval()
    if cfg.exits_from:
        model = BalconyModel.from_pretrained(base, cfg.exits_from, is_trainable=True)
        for j in cfg.exit_layers or []:
            if j not in model.config.exit_layers:
                model.add_exit(j)
    else:
        n = base.config.num_hidden_layers
        layers = cfg.exit_layers or (DEFAULT_EXITS[DEFAULT_MODEL] if is_default(cfg.model) else default_exit_layers(n))
        kind = "norm" if cfg.recipe == "sorted" else cfg.exit_kind
        torch.manual_seed(cfg.seed)
        model = BalconyModel(base, BalconyConfig(exit_layers=list(layers), exit_kind=kind, init=cfg.init, budget_names=cfg.budget_names))
    # Master weights: the exits train in float32 (an exit built from a bf16 base starts from its bf16 values).
    model.exits.float()
    if cfg.recipe == "sorted" or (cfg.recipe == "pretrain" and cfg.exit_kind == "norm"):
        # No exit modules: every exit reads through the base's own (shared, trained) final norm
        # (pretrain + exit_kind norm is Sorted pretraining from scratch, the paper's Table 4 baseline).
        for j in model.config.exit_layers:
            model.exits[str(j)].norm = model.parts.norm
    if cfg.recipe in ("unfrozen", "sorted", "pretrain"):
        model.unfreeze_base()
    if cfg.train_exits:
        for j in cfg.train_exits:
            model.resolve_exit(j)
            if j not in model.config.exit_layers:
                raise ValueError(f"train_exits has {j}, which is not an exit: exits are {model.config.exit_layers}")
        for j in model.config.exit_layers:
            if j not in cfg.train_exits:
                model.exits[str(j)].requires_grad_(False)
    model.checkpoint_exits = cfg.checkpoint_exits
    if cfg.gradient_checkpointing:
        if model.base_trainable:
            model.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for ex in model.exits.values():
            if ex.layer is not None and hasattr(ex.layer, "gradient_checkpointing"):
                ex.layer.gradient_checkpointing = True
    return model, tok


def load_training_data(cfg: TrainConfig, tok, model: BalconyModel) -> tuple[PackedData, PackedData | None]:
    """Train/held-out rows from `cfg.dataset`, or the generated default corpus.

    Several processes: call it on the main process first, then on the others
    (``accelerator.main_process_first()``): the main process generates the corpus and writes
    the token cache, the others find both complete and read them.
    """
    dataset = cfg.dataset
    if dataset is None:
        from .corpus import generated_corpus

        dataset = str(generated_corpus(model, tok, num_tokens=cfg.corpus_tokens, seed=cfg.seed, progress=cfg.progress))
    data_cfg = DataConfig(
        dataset=dataset,
        config_name=cfg.dataset_config,
        split=cfg.split,
        text_field=cfg.text_field,
        messages_field=cfg.messages_field,
        streaming=cfg.streaming,
        seq_len=cfg.seq_len,
        max_tokens=None if cfg.max_tokens is None else cfg.max_tokens + cfg.eval_tokens,
        eval_tokens=cfg.eval_tokens or None,
        seed=cfg.seed,
    )
    max_pos = getattr(model.base.config, "max_position_embeddings", None)
    # One cache file per (dataset, seq_len); prepare_data rebuilds it when the fingerprint changes.
    key = hashlib.sha256(f"{Path(dataset).resolve() if Path(dataset).exists() else dataset}|{cfg.seq_len}|{cfg.text_field}".encode()).hexdigest()[:16]
    cache = cache_dir() / "tokenized" / f"{key}.safetensors"
    train, held_out = prepare_data(data_cfg, tok, max_positions=max_pos, cache_path=cache)
    if len(train) == 0:
        raise ValueError(f"dataset {dataset!r} gave no training rows of {cfg.seq_len} tokens")
    if cfg.max_tokens is not None:
        train = train._rows(slice(0, max(1, cfg.max_tokens // cfg.seq_len)))
    return train, held_out
