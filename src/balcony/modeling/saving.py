"""Saving and loading exits like a PEFT adapter: only the exit weights plus a config naming the base.

`balcony_exits.safetensors` holds the exit weights under the ``exits.`` prefix,
`balcony_config.json` the `BalconyConfig`, which names the base model, its
revision and a fingerprint of its architecture; loading onto another base fails
with a message naming every field that differs.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..inference.quantize import is_quantized, quantization_of
from .arch import architecture_summary, find_parts
from .config import CONFIG_NAME, WEIGHTS_NAME, BalconyConfig
from .loading import load_base

if TYPE_CHECKING:
    from .model import BalconyModel


class ExitsCheckpoint:
    """`save_pretrained` / `from_pretrained` / `push_to_hub` for `BalconyModel` (a mixin)."""

    def exit_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the exit weights, keyed ``exits.<layer>.<...>`` (the PEFT-style prefix)."""
        return {f"exits.{k}": v for k, v in self.exits.state_dict().items()}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the exits as `balcony_exits.safetensors` + `balcony_config.json` (no base weights).

        Example:
            >>> model.save_pretrained("my-exits")  # doctest: +SKIP
        """
        if is_quantized(self):
            raise ValueError(
                f"this model is quantized ({quantization_of(self)}) for decoding; save the exits from the float model "
                f"before calling quantize(), not the quantized copy, to {str(save_directory)!r}"
            )
        os.makedirs(save_directory, exist_ok=True)
        # clone: exits may share a tensor (the Sorted baseline reads the base's own final norm)
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in self.exit_state_dict().items()}
        save_file(tensors, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
        self.config.save(save_directory)

    def load_exits(self, directory: str | os.PathLike, strict: bool = True) -> None:
        """Load exit weights saved by `save_pretrained` into this model's exits."""
        path = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!s}")
        state = load_file(path, device=str(next(self.base.parameters()).device))
        prefix = "exits."
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = self.exits.load_state_dict(stripped, strict=False)
        if strict and (missing or unexpected):
            raise ValueError(f"exit weights in {directory!s} do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")

    @classmethod
    def from_pretrained(
        cls,
        base: nn.Module | str | None,
        exits: str | os.PathLike,
        *,
        revision: str | None = None,
        is_trainable: bool = False,
        **load_kwargs,
    ) -> "BalconyModel":
        """Load exits (a local directory or a hub id) onto a base model.

        Args:
            base: A loaded base model, or its hub id / local path (None: the embedded default).
            exits: Directory written by `save_pretrained`, or a hub repo id holding one.
            revision: Hub revision of the exits repo.
            is_trainable: Return the exits trainable and in train mode (to train them further);
                by default they come back frozen and in eval mode, as PEFT adapters do.
            **load_kwargs: passed to `balcony.load_base` when `base` is a name.

        Raises:
            ValueError: the exits were saved for a base with another architecture;
                the message names each field that differs.

        Example:
            >>> model = BalconyModel.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct", "my-exits")  # doctest: +SKIP
        """
        directory = resolve_exits_dir(exits, revision=revision)
        config = BalconyConfig.load(directory)
        if base is None or isinstance(base, (str, os.PathLike)):
            base, _ = load_base(base, **load_kwargs)
        check_compatible(config, base, where=str(exits))
        model = cls(base, replace(config, base_model_name_or_path=config.base_model_name_or_path))
        model.load_exits(directory)
        model.exits.requires_grad_(is_trainable)
        model.train(is_trainable)
        return model

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: str | None = None, commit_message: str = "Upload Balcony exits") -> str:
        """Upload the exits (not the base) to a hub repo, like a PEFT adapter."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
        return str(info)


def _name_of(base: nn.Module) -> str | None:
    return getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", None) or None


def resolve_exits_dir(exits: str | os.PathLike, revision: str | None = None) -> str:
    """A local exits directory, downloading `exits` from the hub when it is a repo id."""
    path = os.fspath(exits)
    if os.path.isdir(path):
        return path
    looks_like_repo = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise FileNotFoundError(f"exits directory {path!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    except Exception as e:  # offline, missing repo, auth: say which name failed
        raise FileNotFoundError(f"exits {path!r} is neither a local directory nor a reachable hub repo: {e}") from e


def architecture_diffs(config: BalconyConfig, actual: dict) -> list[str]:
    """Every architecture field where a base (`actual`, an `architecture_summary`) differs from the one the exits were saved for."""
    saved = config.base_architecture or {}
    return [
        f"{k}: exits have {saved.get(k)!r}, base has {actual.get(k)!r}"
        for k in sorted(set(actual) | set(saved))
        if saved.get(k) != actual.get(k)
    ]


def check_compatible(config: BalconyConfig, base: nn.Module, where: str = "these exits") -> None:
    """Refuse exits saved for a base with another architecture, naming every field that differs."""
    if config.base_architecture is None:
        return
    actual = architecture_summary(base.config)
    actual["num_hidden_layers"] = len(find_parts(base).layers)
    diffs = architecture_diffs(config, actual)
    if diffs:
        raise ValueError(
            f"exits in {where} were saved for base {config.base_model_name_or_path!r}, "
            f"which does not match this base ({_name_of(base)!r}): " + "; ".join(diffs)
        )
