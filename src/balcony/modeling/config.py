"""`BalconyConfig`: which exits a model has and how they are built.

The config is the JSON half of an exits checkpoint (`balcony_config.json`); the
other half is the exit weights (`balcony_exits.safetensors`). It names the base
model it was made for, so loading exits onto another base fails loudly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from .._version import __version__

CONFIG_NAME = "balcony_config.json"
WEIGHTS_NAME = "balcony_exits.safetensors"

EXIT_KINDS = ("decoder", "mlp", "attention", "norm")
INITS = ("last_layer", "random", "identity")
NORM_INITS = ("final", "random")
DEFAULT_BUDGET_NAMES = ("XS", "S", "M", "L", "XL", "XXL")


def default_budget_names(num_exits: int) -> list[str]:
    """Budget names for `num_exits` exits plus the full model.

    Three exits give ``["S", "M", "L", "XL"]`` as in the paper's deployment story;
    other counts are numbered (``["B1", ..., "FULL"]``) so names never collide.

    Example:
        >>> default_budget_names(3)
        ['S', 'M', 'L', 'XL']
    """
    if num_exits == 3:
        return ["S", "M", "L", "XL"]
    if num_exits == 1:
        return ["S", "XL"]
    if num_exits == 2:
        return ["S", "M", "XL"]
    return [f"B{i + 1}" for i in range(num_exits)] + ["FULL"]


@dataclass
class BalconyConfig:
    """How the Balcony exits of one base model are laid out.

    Args:
        exit_layers: Exit points, counted in decoder layers: exit ``j`` reads the
            hidden state after the base's first ``j`` layers (1 <= j <= N).
        budget_names: One name per exit (ascending depth) plus one for the full
            model, e.g. ``["S", "M", "L", "XL"]``. Defaults from the exit count.
        exit_kind: ``decoder`` (a full decoder layer of the base architecture, the
            paper's Balcony module), ``mlp`` or ``attention`` (half a layer, the
            paper's ablations), or ``norm`` (norm + shared head only: plain early exit).
        init: ``last_layer`` (copy of the base's last decoder layer, the paper's
            default), ``random`` (the base's own initialiser), or ``identity``
            (last-layer copy with its output projections zeroed, so training
            starts exactly at plain early exit).
        norm_init: ``final`` (copy of the base's final norm) or ``random`` (ones).
        base_model_name_or_path: The base model these exits belong to.
        base_model_revision: Its revision (hub commit or tag), when known.
        base_config_fingerprint: Hash of `base_architecture`; filled in by
            `BalconyModel` and checked when exits are loaded.
        base_architecture: The base config's fields that the exits depend on
            (hidden size, layer count, vocab, ...), so a mismatch can be named.
        num_hidden_layers: The base model's layer count (for messages and checks).
        model_type: The base model's ``config.model_type``.

    Example:
        >>> cfg = BalconyConfig(exit_layers=[14, 17, 20])
        >>> cfg.budget_names
        ['S', 'M', 'L', 'XL']
        >>> BalconyConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    exit_layers: list[int] = field(default_factory=list)
    budget_names: list[str] | None = None
    exit_kind: str = "decoder"
    init: str = "last_layer"
    norm_init: str = "final"
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    base_config_fingerprint: str | None = None
    base_architecture: dict[str, Any] | None = None
    num_hidden_layers: int | None = None
    model_type: str | None = None
    balcony_version: str = __version__

    def __post_init__(self) -> None:
        layers = list(self.exit_layers)
        if not layers:
            raise ValueError("exit_layers is empty: give at least one exit layer, e.g. exit_layers=[14, 17, 20]")
        for j in layers:
            if isinstance(j, bool) or not isinstance(j, int):
                raise ValueError(f"exit layer {j!r} is not an integer: exit_layers={layers}")
            if j < 1:
                raise ValueError(f"exit layer {j} is out of range: exits are counted from 1 (after the first layer)")
            if self.num_hidden_layers is not None and j > self.num_hidden_layers:
                raise ValueError(
                    f"exit layer {j} is out of range: the base model has {self.num_hidden_layers} layers; "
                    f"exits: {', '.join(map(str, layers))}"
                )
        dupes = sorted({j for j in layers if layers.count(j) > 1})
        if dupes:
            raise ValueError(f"duplicate exit layers {dupes} in exit_layers={layers}: each exit must be unique")
        self.exit_layers = sorted(layers)
        if self.budget_names is None:
            self.budget_names = default_budget_names(len(self.exit_layers))
        self.budget_names = [str(n) for n in self.budget_names]
        if len(self.budget_names) != len(self.exit_layers) + 1:
            raise ValueError(
                f"budget_names={self.budget_names} has {len(self.budget_names)} names; "
                f"{len(self.exit_layers)} exits need {len(self.exit_layers) + 1} (one per exit, then the full model)"
            )
        if len(set(n.lower() for n in self.budget_names)) != len(self.budget_names):
            raise ValueError(f"budget_names={self.budget_names} repeats a name (names are case-insensitive)")
        for n in self.budget_names:
            if not n or n.isdigit():
                raise ValueError(f"budget name {n!r} is not allowed: names must be non-empty and not a number")
        if self.exit_kind not in EXIT_KINDS:
            raise ValueError(f"exit_kind={self.exit_kind!r} is not one of {EXIT_KINDS}")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is not one of {INITS}")
        if self.norm_init not in NORM_INITS:
            raise ValueError(f"norm_init={self.norm_init!r} is not one of {NORM_INITS}")

    @property
    def full_budget(self) -> str:
        """Name of the full-model budget (the last name)."""
        assert self.budget_names is not None
        return self.budget_names[-1]

    def budget_of(self, exit_layer: int) -> str:
        """The budget name of an exit layer."""
        assert self.budget_names is not None
        return self.budget_names[self.exit_layers.index(exit_layer)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BalconyConfig":
        """Build from a dict; fields this version does not know (written by a newer balcony) are dropped with a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(
                f"ignoring BalconyConfig fields {unknown} that balcony {__version__} does not know "
                f"(saved by balcony {d.get('balcony_version', '?')}); known fields: {sorted(known)}",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "BalconyConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!s}: is this a directory saved by BalconyModel.save_pretrained?")
        with open(path) as f:
            return cls.from_dict(json.load(f))
