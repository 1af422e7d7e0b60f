"""Balcony on vLLM: export each budget as a vLLM model directory, and the vLLM plugin that loads it.

* `balcony.vllm.export`: `export_vllm` writes one directory per budget (config, the exit's
  weights, tokenizer) naming the base by path or hub id; it needs no vLLM.
* `balcony.vllm.plugin`: the ``vllm.general_plugins`` entry point (``balcony``).
* `balcony.vllm.models`: the vLLM model classes (imported by vLLM only).
* `balcony.vllm.worker`: run exported budgets through ``vllm.LLM`` from another Python (tests, benchmark).

vLLM itself is imported only inside `models`, `plugin` and `worker`, so ``import balcony.vllm``
works without it.
"""

from .export import EXIT_FILE, VLLM_FAMILIES, ExportedBudget, export_vllm, read_budget

__all__ = ["EXIT_FILE", "VLLM_FAMILIES", "ExportedBudget", "export_vllm", "read_budget"]
