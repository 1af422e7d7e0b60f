"""The ``vllm.general_plugins`` entry point: registers balcony's model classes with vLLM's registry.

vLLM calls `register` in every process it starts (the API server, the engine core,
each worker), so a budget directory exported by `balcony export-vllm` loads in
``vllm serve DIR`` and ``vllm.LLM(DIR)`` with nothing else to set up. Classes are
registered by name (``module:Class``) so that vLLM imports them only when a
budget is loaded.
"""

from __future__ import annotations

from .export import VLLM_FAMILIES

MODELS_MODULE = "balcony.vllm.models"


def register() -> None:
    """Register every Balcony architecture with vLLM (idempotent)."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for _, arch in VLLM_FAMILIES.values():
        if arch not in supported:
            ModelRegistry.register_model(arch, f"{MODELS_MODULE}:{arch}")
