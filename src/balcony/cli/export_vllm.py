"""`balcony export-vllm`: one vLLM model directory per budget, from saved exits."""

from __future__ import annotations

from .registry import command


@command(name="export-vllm")
def export_vllm_command(
    exits: str,
    out: str,
    model: str | None = None,
    budgets: str | None = None,
    overwrite: bool = False,
) -> int:
    """Export trained exits for vLLM: one directory per budget that `vllm serve DIR` loads as it is.

    Each directory holds the base's config cut to the layers the budget runs, the exit's
    weights and the tokenizer; the base's weights are read from the base named inside (by
    path or hub id), never copied. vLLM finds balcony's model classes through the
    `vllm.general_plugins` entry point, so balcony must be installed where vLLM runs
    (scripts/setup_vllm.sh).

    Args:
        exits: Directory (or hub id) of exits saved by `balcony train` / save_pretrained.
        out: Output directory; budget B goes to OUT/B.
        model: The base's path or hub id (default: the one the exits name; smollm2-135m = the embedded model).
        budgets: Budgets to export, comma-separated (default: all, the full model included).
        overwrite: Replace budget directories that already exist.
    """
    from ..vllm.export import export_vllm

    chosen = [b.strip() for b in budgets.split(",") if b.strip()] if budgets else None
    written = export_vllm(exits, out, base=model, budgets=chosen, overwrite=overwrite)
    for e in written:
        what = "the base model unchanged" if e.num_layers == e.exit_layer else f"layers 1-{e.exit_layer} + its exit"
        print(f"{e.budget}: {e.path} ({what}; {e.num_layers} layers in vLLM)")
    first = written[0].path
    print(f"\nserve one: vllm serve {first} --dtype float32   (balcony must be installed in vLLM's environment)")
    print(f"or all:    balcony serve --engine vllm --exits {exits}")
    return 0
