"""What is evaluated: the full model, each budget, plain early exit and baselines, scored from one pass per base model.

Baselines are exits on the evaluated model's base, or (when their directory holds a
``base/`` folder, as training with a recipe that trains the base writes it) exits on
their own trained base: those add a full-model row of their own.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..modeling.arch import find_parts
from ..modeling.config import BalconyConfig
from ..modeling.loading import (
    DEFAULT_EXITS,
    DEFAULT_MODEL,
    default_exit_layers,
    is_default,
    load_base,
)
from ..modeling.model import BalconyModel
from ..modeling.saving import resolve_exits_dir

FULL = "full"


BALCONY = "balcony"


EARLY_EXIT = "early-exit"


RESERVED_METHODS = (FULL, BALCONY, EARLY_EXIT)


def load_balcony(
    model: str | os.PathLike | torch.nn.Module | None = None,
    exits: str | os.PathLike | None = None,
    *,
    exit_kind: str | None = None,
    exit_layers: Sequence[int] | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
) -> tuple[BalconyModel, Any, bool]:
    """A base model with exits, for evaluation.

    Args:
        model: Base model hub id or local path (None / ``""`` / ``"default"``: the embedded
            default), or a loaded HF model (then the tokenizer returned is None).
        exits: Trained exits (directory or hub id). Without them, fresh untrained exits
            are attached at `exit_layers` (default: the paper's depths) with a warning.
        exit_kind: ``norm`` for plain early exit (final norm + head) at the layers of
            `exits` (or `exit_layers`); None for the exits' own kind (``decoder`` when fresh).
        exit_layers: Layers for fresh exits.
        dtype: Weights dtype.
        device: Where to load the base.

    Returns:
        (model, tokenizer, trained): trained is True when `exits` were loaded.

    Raises:
        ValueError: `exit_kind` contradicts the saved exits, or a bad layer / kind.
    """
    if isinstance(model, torch.nn.Module):
        base, tok = model, None
    else:
        base, tok = load_base(model or None, dtype=dtype, device=device)
    if exits:
        directory = resolve_exits_dir(exits)
        saved = BalconyConfig.load(directory)
        if exit_kind == "norm" and saved.exit_kind != "norm":
            config = BalconyConfig(exit_layers=saved.exit_layers, budget_names=saved.budget_names, exit_kind="norm")
            return BalconyModel(base, config), tok, False
        if exit_kind not in (None, saved.exit_kind):
            raise ValueError(f"exit_kind={exit_kind!r} does not match the exits in {str(exits)!r}, which are {saved.exit_kind!r}")
        return BalconyModel.from_pretrained(base, directory), tok, True
    if exit_layers:
        layers = list(exit_layers)
    elif isinstance(model, torch.nn.Module) or not is_default(model or None):
        layers = default_exit_layers(find_parts(base).num_layers)
    else:
        layers = list(DEFAULT_EXITS[DEFAULT_MODEL])
    kind = exit_kind or "decoder"
    if kind != "norm":
        warnings.warn(
            f"no exits given: evaluating freshly initialised, untrained {kind} exits at layers {layers} "
            "(pass trained exits for real numbers, or exit_kind=norm for plain early exit)",
            stacklevel=2,
        )
    return BalconyModel(base, BalconyConfig(exit_layers=layers, exit_kind=kind)), tok, False


def early_exit_model(model: BalconyModel) -> BalconyModel:
    """Plain early exit at `model`'s exit layers (a copy of the final norm + the LM head), on the same base."""
    config = BalconyConfig(exit_layers=model.exit_layers, budget_names=model.config.budget_names, exit_kind="norm")
    return BalconyModel(model.base, config)


@dataclass
class Variant:
    """One row of the table: a method at one budget.

    Attributes:
        method: ``full``, ``balcony``, ``early-exit`` or a baseline's name.
        budget: The budget name (``S``, ..., the full budget's name for ``full``).
        layer: Exit layer (N for the full model).
        model: The `BalconyModel` holding this exit (variants on one base share it).
        full: True for a full model (final norm of the base, no exit module): the evaluated
            model's (method ``full``) or a baseline's own trained base.
    """

    method: str
    budget: str
    layer: int
    model: BalconyModel
    full: bool = False

    @property
    def key(self) -> str:
        """``"full"`` (the evaluated model's base) or ``"<method>/<budget>"`` (``"unfrozen/XL"``: a baseline's own base)."""
        return FULL if self.full and self.method == FULL else f"{self.method}/{self.budget}"

    @property
    def params(self) -> int:
        """Non-embedding parameters this variant runs."""
        if self.full:
            m = self.model
            return sum(p.numel() for layer in m.parts.layers for p in layer.parameters()) + sum(
                p.numel() for p in m.parts.norm.parameters()
            )
        return self.model.count_parameters(self.layer)


def build_variants(
    model: BalconyModel,
    *,
    early_exit: bool = True,
    baselines: Mapping[str, str | os.PathLike | BalconyModel] | None = None,
    budgets: Sequence[str | int] | None = None,
    method: str = BALCONY,
) -> list[Variant]:
    """The full model, `model`'s budgets, plain early exit at the same layers, and baselines.

    Args:
        model: The Balcony model under test.
        early_exit: Add the plain early-exit baseline at `model`'s exit layers.
        baselines: name -> exits directory or `BalconyModel`; all their budgets are scored.
            A directory is loaded onto `model`'s base, unless it holds a ``base/`` folder (a
            recipe that trained the base saved it there): then onto that base, which adds the
            baseline's own full-model row (``"<name>/<full budget>"``). A `BalconyModel` on
            another base also adds its full row.
        budgets: Restrict `model` and its early-exit twin to these budgets (names or layers).
        method: The name of `model`'s rows.

    Raises:
        ValueError: a budget `model` does not have, a clashing or empty baseline name,
            or a baseline whose base has another vocabulary or depth.
    """
    n = model.num_layers
    pairs = list(zip(model.config.budget_names[:-1], model.exit_layers))
    if budgets:
        wanted = {model.resolve_exit(b) for b in budgets}
        pairs = [(name, j) for name, j in pairs if j in wanted]
    variants = [Variant(FULL, model.config.full_budget, n, model, full=True)]
    variants += [Variant(method, name, j, model) for name, j in pairs]
    if early_exit and model.config.exit_kind != "norm":
        twin = early_exit_model(model)
        variants += [Variant(EARLY_EXIT, name, j, twin) for name, j in pairs]
    for name, source in (baselines or {}).items():
        if not name or "/" in name or name.lower() in RESERVED_METHODS or name == method:
            raise ValueError(f"baseline name {name!r} is not allowed: use a non-empty name without '/', not one of {RESERVED_METHODS}")
        other = source if isinstance(source, BalconyModel) else _load_baseline(model, source)
        if other.base is not model.base:
            _check_same_shape(model, other, name)
            variants.append(Variant(name, other.config.full_budget, other.num_layers, other, full=True))
        variants += [Variant(name, b, j, other) for b, j in zip(other.config.budget_names[:-1], other.exit_layers)]
    return variants


TRAINED_BASE_DIR = "base"


def _load_baseline(model: BalconyModel, directory: str | os.PathLike) -> BalconyModel:
    """Exits from `directory` on `model`'s base, or on the trained base saved in ``directory/base``."""
    own = os.path.join(os.fspath(directory), TRAINED_BASE_DIR)
    if not os.path.isdir(own):
        return BalconyModel.from_pretrained(model.base, directory)
    ref = next(model.base.parameters())
    base, _ = load_base(own, dtype=ref.dtype, device=ref.device)
    return BalconyModel.from_pretrained(base, directory)


def _check_same_shape(model: BalconyModel, other: BalconyModel, name: str) -> None:
    """A baseline on its own base must read the same tokens (vocabulary) and have the same depth."""
    mine, theirs = model.parts.lm_head.weight.shape[0], other.parts.lm_head.weight.shape[0]
    if mine != theirs or model.num_layers != other.num_layers:
        raise ValueError(
            f"baseline {name!r} has its own base with {theirs} vocabulary entries and {other.num_layers} layers; "
            f"the evaluated model has {mine} and {model.num_layers}: a baseline's base must share the tokenizer and depth"
        )


@torch.no_grad()
def exit_hidden_states(
    variants: Sequence[Variant],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One pass of each base feeding every variant on it: key -> (B, T, H) state before the LM head.

    Each base runs its N layers once; each exit runs on the hidden state at its
    layer, exactly as `BalconyModel.forward` would at that budget (and as
    `distill_forward` does for one model's exits). Variants on the same base (the
    usual case) cost one pass; a baseline with its own trained base costs one more.
    """
    groups: dict[int, list[Variant]] = {}
    for v in variants:
        groups.setdefault(id(v.model.base), []).append(v)
    out: dict[str, torch.Tensor] = {}
    for group in groups.values():
        lead = group[0].model
        # One base pass (as distill_forward) feeds several models' exits.
        wanted = {v.layer for v in group if not v.full}
        taps, final, (masks, layer_kwargs) = lead.base_pass(input_ids, wanted, attention_mask, position_ids)
        for v in group:
            if v.full:
                out[v.key] = final
            else:
                out[v.key] = v.model._run_exit(v.layer, taps[v.layer], masks, layer_kwargs, None, False)
    return {v.key: out[v.key] for v in variants}
