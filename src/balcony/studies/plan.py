"""What a study trains: its variants (each the reference with one factor changed), its panels and claims, and the equal-compute plan.

A study is a reference training recipe and variants that each change exactly one
factor of it (the exit module, its initialisation, the loss, the recipe). Every
variant trains on the same tokens, in the same order, for the same optimizer steps
with the same optimizer settings; a lever of the best-known recipe that some
variant cannot take is dropped for every variant of the study (`Study.dropped`
says which and why), so that the comparison stays one factor at a time.

    study = STUDIES["figure5"]
    configs = study_configs(study, TrainConfig.from_yaml("smollm2-default"), steps=60, output="runs/ablate")
    configs["mlp"].exit_kind  # 'mlp'
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..training.config import TrainConfig


@dataclass(frozen=True)
class StudyVariant:
    """One trained variant: the reference with `overrides` applied.

    Attributes:
        name: Its directory and row name (``mlp``, ``kl-ce``, ...; no ``/``).
        label: What it is, for legends and tables.
        overrides: `TrainConfig` fields that differ from the reference (empty for the reference).
        keep_levers: Keep the best-known recipe's levers that the study drops for everyone
            else (a context row outside the claims: what those levers are worth at equal steps).
    """

    name: str
    label: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    keep_levers: bool = False


@dataclass(frozen=True)
class Panel:
    """One panel of the figure: the reference against the variants that test one claim.

    Attributes:
        key: Short name (``exit``, ``loss``, ``recipe``, ``scratch``).
        title: The panel's title.
        claim: The claim (1-4) the panel decides.
        variants: Variant names, the reference first.
    """

    key: str
    title: str
    claim: int
    variants: tuple[str, ...]


@dataclass(frozen=True)
class Study:
    """A reference, its one-factor variants, the panels they form and the claims they test.

    Attributes:
        name: ``figure5`` or ``table4``.
        reference: The variant every other one is paired against.
        variants: All variants, the reference first.
        panels: The figure's panels.
        claims: claim number -> the paper's claim in words.
        dropped: TrainConfig field -> why the study turns it off for every variant.
        from_scratch: True when every variant pretrains a fresh base (table4).
    """

    name: str
    reference: str
    variants: tuple[StudyVariant, ...]
    panels: tuple[Panel, ...]
    claims: Mapping[int, str]
    dropped: Mapping[str, str]
    from_scratch: bool = False

    def variant(self, name: str) -> StudyVariant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"study {self.name!r} has no variant {name!r}: variants are {', '.join(v.name for v in self.variants)}")


# The levers of the best-known recipe (smollm2-default) that an ablated factor forbids.
DROPPED = {
    "warm_start": "the lstsq warm start fits the MLP output projection of a decoder or MLP exit on a frozen base: "
    "attention exits and the recipes that train the base cannot take it",
    "loss_vocab": "the loss vocabulary needs pure KL on a frozen base: KL+CE (labels outside it) and the recipes "
    "that train the base (the teacher moves) cannot take it",
    "cache_features": "caching the frozen pass needs a frozen base; it saves time only from the second epoch on, and "
    "without it every variant runs its frozen pass the same way, in float32",
}

FIGURE5 = Study(
    name="figure5",
    reference="balcony",
    variants=(
        StudyVariant("balcony", "decoder exit, last-layer init, KL, frozen base (reference)"),
        StudyVariant("random-init", "decoder exit, random init", {"init": "random"}),
        StudyVariant("mlp", "MLP-only exit", {"exit_kind": "mlp"}),
        StudyVariant("attention", "attention-only exit", {"exit_kind": "attention"}),
        StudyVariant("kl-ce", "KL + CE loss (weight 1)", {"loss": "kl+ce", "ce_weight": 1.0}),
        StudyVariant("unfrozen", "base trained too (unfrozen Balcony)", {"recipe": "unfrozen"}),
        StudyVariant("sorted", "Sorted fine-tuning (no exit modules)", {"recipe": "sorted"}),
        StudyVariant("best-known", "reference + lstsq warm start + loss vocabulary (context)", keep_levers=True),
    ),
    panels=(
        Panel("exit", "(a) exit module and initialisation", 1, ("balcony", "random-init", "mlp", "attention")),
        Panel("loss", "(b) distillation loss", 2, ("balcony", "kl-ce")),
        Panel("recipe", "(c) frozen base vs training it", 3, ("balcony", "unfrozen", "sorted")),
    ),
    claims={
        1: "A full decoder layer initialised from the last layer beats the same layer randomly initialised, "
        "and beats MLP-only and attention-only exits, at every budget.",
        2: "Adding cross-entropy to the KL loss gives no significant gain.",
        3: "Freezing the base beats training it too (unfrozen Balcony) and beats Sorted fine-tuning at most budgets, "
        "and only freezing keeps the full model exactly as it was.",
    },
    dropped=DROPPED,
)

TABLE4 = Study(
    name="table4",
    reference="balcony",
    variants=(
        StudyVariant("balcony", "Balcony exits (decoder layer + norm), pretrained with the base", {"exit_kind": "decoder"}),
        StudyVariant("sorted", "Sorted: sub-models read through the shared final norm and head", {"exit_kind": "norm"}),
    ),
    panels=(Panel("scratch", "pretraining from scratch", 4, ("balcony", "sorted")),),
    claims={4: "When pretraining from scratch, Balcony sub-models beat Sorted ones at every size."},
    dropped={k: "a lever for exits on a frozen base; pretraining trains the base" for k in DROPPED},
    from_scratch=True,
)

STUDIES = {s.name: s for s in (FIGURE5, TABLE4)}


def get_study(name: str) -> Study:
    """The study called `name`.

    Raises:
        ValueError: no such study; the message lists them.
    """
    if name not in STUDIES:
        raise ValueError(f"study {name!r} is not one of {', '.join(STUDIES)}")
    return STUDIES[name]


def select_variants(study: Study, names: str | list[str] | None) -> list[StudyVariant]:
    """The variants to run: all, or `names` (the reference is always kept; order as in the study).

    Raises:
        ValueError: an unknown name; the message lists the study's variants.
    """
    if not names:
        return list(study.variants)
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    known = {v.name for v in study.variants}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown variants {unknown} for study {study.name!r}: variants are {', '.join(sorted(known))}")
    return [v for v in study.variants if v.name in wanted or v.name == study.reference]


def tokens_per_step(cfg: TrainConfig) -> int:
    """Training tokens one optimizer step reads (one process)."""
    return cfg.batch_size * cfg.grad_accum * cfg.seq_len


def study_configs(
    study: Study,
    base: TrainConfig,
    *,
    steps: int,
    output: str | os.PathLike,
    variants: list[StudyVariant] | None = None,
    save_every: int | None = None,
) -> dict[str, TrainConfig]:
    """One `TrainConfig` per variant: `base`, minus the dropped levers, plus the variant's change.

    Every config trains `steps` optimizer steps on the same first ``steps x batch x
    seq_len`` training tokens (one epoch when the data holds that many), with the
    same seed and optimizer settings, into ``output/variants/<name>``.

    Args:
        study: The study.
        base: The best-known recipe and the run's settings (model, exits, data, lr, ...).
        steps: Optimizer steps of every variant.
        output: The study's folder.
        variants: Which variants (default all).
        save_every: Checkpoint interval in steps (default: about five checkpoints a run).

    Raises:
        ValueError: `steps` < 1, or a variant's change makes an invalid config (the message names it).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer (optimizer steps per variant)")
    out = Path(output)
    common = {
        "max_steps": steps,
        "max_tokens": steps * tokens_per_step(base),
        "eval_every": 0,
        "save_every": save_every if save_every is not None else max(1, steps // 5),
        "resume": True,
        "warmup_loss": None,
        "warmup_fraction": 0.0,
        "train_exits": None,
        "exits_from": None,
    }
    if study.from_scratch:
        common["recipe"] = "pretrain"
    levers = {k: getattr(base, k) for k in study.dropped}
    off = {"warm_start": None, "loss_vocab": None, "cache_features": False}
    configs = {}
    for v in variants or list(study.variants):
        fields = {**base.to_dict(), **common, **{k: off[k] for k in study.dropped}}
        if v.keep_levers:
            fields.update(levers)
        fields.update(v.overrides)
        fields["output_dir"] = str(out / "variants" / v.name)
        try:
            configs[v.name] = TrainConfig.from_dict(fields, source=f"study {study.name} variant {v.name!r}")
        except ValueError as e:
            raise ValueError(f"variant {v.name!r} ({v.label}) cannot be trained with these settings: {e}") from None
    return configs


def differing_fields(a: TrainConfig, b: TrainConfig, ignore: tuple[str, ...] = ("output_dir", "progress")) -> dict[str, tuple[Any, Any]]:
    """field -> (a's value, b's value) for the fields where two configs differ.

    Example:
        >>> differing_fields(TrainConfig(lr=1e-3), TrainConfig(lr=2e-3))
        {'lr': (0.001, 0.002)}
    """
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return {k: (da[k], db[k]) for k in da if k not in ignore and da[k] != db[k]}
