"""What several commands share: the model a command runs, and prompt encoding."""

from __future__ import annotations

import torch

from ..inference.quantize import parse_mode
from ..modeling.config import BalconyConfig
from ..modeling.loading import (
    DEFAULT_EXITS,
    DEFAULT_MODEL,
    default_exit_layers,
    is_default,
    load_base,
    pick_device,
    pick_dtype,
)
from ..modeling.model import BalconyModel


def build_model(
    model: str | None,
    exits: str | None,
    exit_layers: list[int] | None = None,
    exit_kind: str = "decoder",
    dtype: str | None = "auto",
    device: str | None = None,
    quantize: str | None = None,
) -> tuple[BalconyModel, object, bool]:
    """Base + exits for a command, weight-quantized if asked (`BalconyModel.quantize`); returns (model, tokenizer, trained?).

    Args:
        dtype: Weights dtype; "auto" (or None): bfloat16 on CUDA, else float32 (`pick_dtype`).
        device: Where the model runs; None / "auto": CUDA, then MPS, else the CPU (`pick_device`).
    """
    if quantize:
        parse_mode(quantize)  # a bad mode fails before the model loads
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    base, tok = load_base(model, dtype=dtype, device=device)
    if exits:
        m, trained = BalconyModel.from_pretrained(base, exits), True
    else:
        n = base.config.num_hidden_layers
        layers = exit_layers or (DEFAULT_EXITS[DEFAULT_MODEL] if is_default(model) else default_exit_layers(n))
        m, trained = BalconyModel(base, BalconyConfig(exit_layers=layers, exit_kind=exit_kind)), False
    if quantize:
        m.quantize(quantize)
    return m, tok, trained


def encode_prompt(tok, prompt: str, chat: bool) -> torch.Tensor:
    """Prompt -> (1, T) ids, through the chat template when asked and available."""
    if not prompt.strip():
        raise ValueError("the prompt is empty: give some text to continue")
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tok(prompt, return_tensors="pt").input_ids


def parse_exits(text: str | None, option: str) -> tuple[int | str, ...] | None:
    """``"S,L"`` or ``"14,20"`` -> ("S", "L") / (14, 20), for `ExitPolicy.exits`; None or "all" -> None (every exit).

    The names are resolved against the model where they are used, so an unknown one is named there.
    """
    if text is None or str(text).strip().lower() in ("", "all"):
        return None
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"{option} {text!r} names no exit; give budget names or layers, e.g. S,L")
    return tuple(int(t) if t.isdigit() else t for t in items)


def parse_floats(text: str, option: str) -> list[float]:
    """``"0.5,0.7"`` -> [0.5, 0.7]; a clear error naming `option` and the bad item otherwise."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            out.append(float(item))
        except ValueError:
            raise ValueError(f"{option} {text!r}: {item!r} is not a number; give comma-separated numbers, e.g. 0.5,0.7,0.9") from None
    if not out:
        raise ValueError(f"{option} {text!r} holds no number; give comma-separated numbers, e.g. 0.5,0.7,0.9")
    return out
