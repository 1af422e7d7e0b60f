"""balcony's vLLM model classes: one budget of a Balcony model as a vLLM model of the base's family.

An exported budget's config says ``num_hidden_layers = j + 1``: vLLM's own model
class for the family builds layers ``0..j-1`` (the base's), layer ``j`` (the
Balcony exit's decoder layer, so its attention gets its own paged KV cache under
the unique prefix ``model.layers.{j}``) and the final norm (the exit's norm).
Everything vLLM does for that family (paged attention, continuous batching,
tensor / pipeline parallelism, torch.compile, CUDA graphs, quantization) applies
unchanged. These classes only decide where weights come from:

* the budget directory (primary source): the exit's layer and norm;
* the base model named in the config (a second source, ``secondary_weights``):
  embeddings, layers ``0..j-1`` and the LM head. Its layers ``>= j`` and its
  final norm are skipped (safetensors shards holding nothing else are not read).

Registered with vLLM by `balcony.vllm.plugin.register` (the ``vllm.general_plugins``
entry point), so vLLM's spawned engine and worker processes find them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from .export import CONFIG_KEY

BASE_PREFIX = "balcony_base."
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class BalconyBudgetMixin:
    """Routes the weights of a budget: the exit from the budget directory, the rest from the base."""

    def _init_balcony(self, vllm_config: VllmConfig) -> None:
        hf_config = vllm_config.model_config.hf_config
        block = getattr(hf_config, CONFIG_KEY, None)
        if not isinstance(block, dict):
            raise ValueError(
                f"{type(self).__name__} needs the {CONFIG_KEY!r} block that `balcony export-vllm` writes into "
                f"config.json; {vllm_config.model_config.model!r} has none"
            )
        self.balcony_budget = block["budget"]
        self.balcony_exit_layer = int(block["exit_layer"])
        n = int(block["base_num_hidden_layers"])
        full = self.balcony_exit_layer == n
        has_layer = not full and block.get("exit_kind") == "decoder"
        expected = self.balcony_exit_layer + int(has_layer)
        if hf_config.num_hidden_layers != expected:
            raise ValueError(
                f"config of budget {self.balcony_budget!r} has num_hidden_layers={hf_config.num_hidden_layers}; "
                f"exit layer {self.balcony_exit_layer} of a {n}-layer base with a {block.get('exit_kind')!r} exit needs {expected}"
            )
        self._skip_base_norm = not full

        def unused(name: str) -> bool:
            """Base weights this budget replaces or never runs: layers >= j and (below the full budget) the final norm."""
            hit = _LAYER.match(name)
            if hit:
                return int(hit.group(1)) >= self.balcony_exit_layer
            return self._skip_base_norm and name.startswith("model.norm.")

        self._base_unused = unused
        self.secondary_weights = [
            DefaultModelLoader.Source(
                block["base_model"], block.get("base_revision"), prefix=BASE_PREFIX, is_unused_weight=unused,
            )
        ]

    def _route(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name.startswith(BASE_PREFIX):
                name = name[len(BASE_PREFIX):]
                if self._base_unused(name):
                    continue
            yield name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self._route(weights))  # type: ignore[misc]


class BalconyLlamaForCausalLM(BalconyBudgetMixin, LlamaForCausalLM):
    """One Balcony budget of a Llama-family base (SmolLM2, Llama 2/3, ...) in vLLM."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._init_balcony(vllm_config)


class BalconyQwen2ForCausalLM(BalconyBudgetMixin, Qwen2ForCausalLM):
    """One Balcony budget of a Qwen2 base in vLLM (Qwen2's own attention with qkv bias and decoder layer)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_balcony(vllm_config)
