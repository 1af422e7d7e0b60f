"""Weight-only quantization for decoding (gpt-fast style): int8 per output channel, int4 per group.

At batch 1 a decode step streams every weight from memory once, so its speed
is set by the bytes of the weights, not by the arithmetic. Storing the weights
of every linear layer in int8 (or int4) cuts those bytes 4x (8x); the
activations stay in floating point. How the product is computed depends on the
device the input is on:

* on the CPU, PyTorch's packed weight-only kernels (`torch._weight_int8pack_mm`,
  `torch._weight_int4pack_mm_for_cpu`), which take bfloat16 activations and
  scales (the input is cast for them and the result cast back);
* anywhere else (CUDA, MPS, ...), the weights are dequantised in the graph and
  multiplied with `F.linear` in the input's dtype, as gpt-fast does: under
  `torch.compile` (``compile=True``) inductor fuses the dequantisation into the
  matmul, so only the int8 / int4 bytes are read. Without compile each call
  materialises the float weight (correct, and slower than the float model).

* `Int8Linear`: symmetric per-output-channel int8 weights, ``w ~= q * scale``,
  the same layout on every device.
* `Int4Linear`: asymmetric int4 weights in groups of `group_size` input
  channels, ``w ~= (q - 8) * scale + zero`` (gpt-fast's layout). Made on the CPU it
  is packed for the CPU kernel (a layout only that kernel reads: move the float
  model first, then quantize); made on another device it keeps two 4-bit values
  per byte, which any device dequantises.
* `quantize_model` swaps the linear layers of the base's decoder layers, the
  exits' layers and the LM head in place (the head is int8 in every mode:
  quantized to int4 it was by far the largest error). A tied LM head is untied: the
  embedding keeps its floating-point weight (a lookup reads one row per token,
  so it costs nothing to keep) and the head gets its own quantized copy.

The module tree stays a Hugging Face model, so HF `generate` runs on the
quantized model too (`balcony bench --quantize int8` times both).
Quantization is for inference: quantized weights are frozen and their exits
cannot be trained or saved as float exits again.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .devices import is_dispatched

QUANTIZE_MODES = ("int8", "int4")
DEFAULT_INT4_GROUP = 32


def parse_mode(mode: str) -> tuple[str, int | None]:
    """'int8' -> ('int8', None); 'int4' / 'int4-32' -> ('int4', group size). Raises ValueError naming the bad mode."""
    m = re.fullmatch(r"(int8|int4)(?:[-:/]g?(\d+))?", str(mode).strip().lower())
    if not m or (m.group(1) == "int8" and m.group(2)):
        raise ValueError(
            f"quantize={mode!r} is not a quantization mode: use 'int8' (per-channel) or 'int4' "
            f"(groups of {DEFAULT_INT4_GROUP}; 'int4-64', 'int4-128' pick the group size)"
        )
    if m.group(1) == "int8":
        return "int8", None
    group = int(m.group(2) or DEFAULT_INT4_GROUP)
    if group not in (32, 64, 128, 256):
        raise ValueError(f"quantize={mode!r}: the int4 group size must be 32, 64, 128 or 256, not {group}")
    return "int4", group


def _frozen(t: torch.Tensor) -> nn.Parameter:
    # A parameter (not a buffer) so parameter counts and `.to(device)` treat it like the float weight it replaces.
    return nn.Parameter(t, requires_grad=False)


def uses_cpu_kernel(x: torch.Tensor) -> bool:
    """Whether a quantized layer multiplies `x` with the CPU's packed kernels (else: dequantise in the graph)."""
    return x.device.type == "cpu"


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(..., K) @ int8 (N, K) weight with (N,) scales -> (..., N), in x's dtype, on x's device."""
    if uses_cpu_kernel(x):
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), weight, scales)
        return y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)
    # gpt-fast's weight-only int8: the int8 -> float cast sits in the graph, so inductor fuses it into the matmul.
    return nn.functional.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


class Int8Linear(nn.Module):
    """A weight-only int8 `nn.Linear`: (N, K) int8 weights and (N,) bfloat16 scales.

    Args:
        linear: The float layer to quantize (its bias is kept in its own dtype).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        # (N,) symmetric, per output channel, rounded to the bfloat16 the kernel reads before the weights are
        # rounded against it (so each weight is within half a step of what the kernel computes with).
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8).to(torch.bfloat16)
        q = torch.round(w / scales.float()[:, None]).clamp(-128, 127).to(torch.int8)
        self.weight = _frozen(q)
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else _frozen(linear.bias.detach().clone())

    def dequantize(self) -> torch.Tensor:
        """The (N, K) float32 weight this layer computes with."""
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x, self.weight, self.scales)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


INT4_LAYOUTS = ("cpu", "nibbles")


class Int4Linear(nn.Module):
    """A weight-only int4 `nn.Linear` with per-group (scale, zero) in bfloat16.

    Args:
        linear: The float layer to quantize; `in_features` must be a multiple of `group_size`.
        group_size: Input channels sharing one (scale, zero).
        layout: "cpu" (packed for `torch._weight_int4pack_mm_for_cpu`; needs `out_features` % 16 == 0
            and the CPU) or "nibbles" (two values per byte, dequantised in the graph on any device).
            Default: "cpu" for a layer on the CPU, else "nibbles".
    """

    def __init__(self, linear: nn.Linear, group_size: int = DEFAULT_INT4_GROUP, layout: str | None = None):
        super().__init__()
        n, k = linear.out_features, linear.in_features
        if k % group_size:
            raise ValueError(f"int4 group size {group_size} does not divide in_features={k}")
        device = linear.weight.device
        layout = layout or ("cpu" if device.type == "cpu" else "nibbles")
        if layout not in INT4_LAYOUTS:
            raise ValueError(f"int4 layout {layout!r} is not one of {INT4_LAYOUTS}")
        if layout == "cpu" and (device.type != "cpu" or n % 16):
            raise ValueError(f"the CPU int4 kernel needs a CPU layer with out_features % 16 == 0, not {n} on {device}")
        self.in_features, self.out_features, self.group_size, self.layout = k, n, group_size, layout
        w = linear.weight.detach().float().reshape(n, k // group_size, group_size)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-6).to(torch.bfloat16).float()  # the kernel reads bfloat16
        zero = (lo + 8 * scale).to(torch.bfloat16).float()  # dequantized: (q - 8) * scale + zero, q in 0..15
        q = torch.round((w - zero) / scale + 8).clamp(0, 15).to(torch.int32).reshape(n, k)
        if layout == "cpu":
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        else:  # (N, K / 2) bytes: input channel 2i in the low nibble, 2i + 1 in the high one
            packed = (q[:, ::2] | (q[:, 1::2] << 4)).to(torch.uint8)
        self.weight = _frozen(packed)
        sz = torch.stack([scale.reshape(n, -1), zero.reshape(n, -1)], -1).transpose(0, 1).contiguous()  # (K/g, N, 2)
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))
        self.bias = None if linear.bias is None else _frozen(linear.bias.detach().clone())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weight of the "nibbles" layout, (q - 8) * scale + zero per group computed in float32, in `dtype`."""
        if self.layout != "nibbles":
            raise ValueError("dequantize() reads the 'nibbles' layout; the CPU layout is read by its kernel only")
        n, k, g = self.out_features, self.in_features, self.group_size
        q = torch.stack([self.weight & 15, self.weight >> 4], -1).reshape(n, k // g, g)  # (N, K/g, g) in 0..15
        scale, zero = self.scales_and_zeros.transpose(0, 1).float().unbind(-1)  # (N, K/g) each
        return ((q.float() - 8) * scale[..., None] + zero[..., None]).reshape(n, k).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.layout == "cpu":
            if not uses_cpu_kernel(x):
                raise ValueError(
                    f"this int4 layer is packed for the CPU kernel but runs on {x.device}: quantize the model after "
                    f"moving it (model.to({str(x.device)!r}) first, then .quantize('int4'))"
                )
            y = torch._weight_int4pack_mm_for_cpu(
                x.reshape(-1, shape[-1]).to(torch.bfloat16), self.weight, self.group_size, self.scales_and_zeros
            )
            y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        else:  # dequantised in the graph: inductor fuses it into the matmul under compile
            y = nn.functional.linear(x, self.dequantize(x.dtype))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"layout={self.layout}, bias={self.bias is not None}"
        )


QUANTIZED = (Int8Linear, Int4Linear)


def head_rows(head: nn.Module, rows: int):
    """A function computing only the first `rows` outputs of a linear head: (..., K) -> (..., rows).

    Self-speculative drafting uses it to score only the first token ids (the
    head's weight rows are read once per draft, so fewer rows is less time).
    A float or int8 head reads only those rows; any other module runs whole and is sliced.
    """
    if rows >= head.out_features:
        return head
    if hasattr(head, "_hf_hook"):  # accelerate moves (or loads) the weight in the module call: run it whole
        return lambda x: head(x)[..., :rows]
    if type(head) is nn.Linear:
        w, b = head.weight[:rows], None if head.bias is None else head.bias[:rows]
        return lambda x: nn.functional.linear(x, w, b)
    if isinstance(head, Int8Linear):
        w, s, b = head.weight[:rows], head.scales[:rows], None if head.bias is None else head.bias[:rows]

        def int8_rows(x: torch.Tensor) -> torch.Tensor:
            y = int8_matmul(x, w, s)
            return y if b is None else y + b

        return int8_rows
    return lambda x: head(x)[..., :rows]


def quantize_linear(linear: nn.Linear, mode: str = "int8") -> nn.Module:
    """One float `nn.Linear` -> its quantized replacement.

    int4 falls back to int8 where the group does not divide in_features, and on the CPU where
    the kernel cannot take the shape (out_features not a multiple of 16).
    """
    kind, group = parse_mode(mode)
    fits = linear.in_features % group == 0 if group else False
    if kind == "int4" and fits and (linear.out_features % 16 == 0 or linear.weight.device.type != "cpu"):
        return Int4Linear(linear, group)
    return Int8Linear(linear)


def _swap_linears(root: nn.Module, mode: str) -> int:
    """Replace every nn.Linear under `root` (not `root` itself); returns how many."""
    count = 0
    for name, child in list(root.named_children()):
        if type(child) is nn.Linear:
            setattr(root, name, quantize_linear(child, mode))
            count += 1
        else:
            count += _swap_linears(child, mode)
    return count


@torch.no_grad()
def quantize_model(model, mode: str = "int8") -> int:
    """Quantize a `BalconyModel` in place: decoder layers, exit layers and the LM head.

    The embedding stays in floating point (with tied embeddings the head gets
    its own quantized copy). Returns the number of linear layers replaced.

    Raises:
        ValueError: an unknown mode (the message names it), or a model already quantized.
    """
    parse_mode(mode)
    if is_dispatched(model.base):
        raise ValueError(
            "quantize needs the base's weights in memory on one device; this base was loaded with a device_map or "
            "offload (accelerate hooks, weights on 'meta' until used): load it with device=... and quantize that"
        )
    if is_quantized(model):
        raise ValueError(f"this model is already quantized ({quantization_of(model)}); quantize a float model")
    parts = model.parts
    count = sum(_swap_linears(layer, mode) for layer in parts.layers)
    count += sum(_swap_linears(ex, mode) for ex in model.exits.values())
    head = parts.lm_head
    if type(head) is nn.Linear:
        # The head is int8 in every mode: with int4 it alone raised KL(float || quantized) 30x on SmolLM2-135M.
        new_head = quantize_linear(head, "int8")
        for name, child in model.base.named_children():  # the head is a direct child of *ForCausalLM
            if child is head:
                setattr(model.base, name, new_head)
        parts.lm_head = new_head
        count += 1
    model.base.config.tie_word_embeddings = False  # nothing may re-tie a float embedding onto the int head
    model.__dict__["_balcony_quantized"] = mode
    model.__dict__.pop("_balcony_compiled", None)  # compiled steps captured the float modules
    return count


def quantize_int8(model) -> int:
    """`quantize_model(model, "int8")`: weight-only int8 for the layers, exits and LM head; returns the layer count."""
    return quantize_model(model, "int8")


def quantize_int4(model, group_size: int = DEFAULT_INT4_GROUP) -> int:
    """`quantize_model(model, f"int4-{group_size}")`."""
    return quantize_model(model, f"int4-{group_size}")


def is_quantized(model) -> bool:
    """Whether any linear layer of the model is quantized."""
    return any(isinstance(m, QUANTIZED) for m in model.modules())


def quantization_of(model) -> str | None:
    """The mode `quantize_model` applied, or None for a float model."""
    return model.__dict__.get("_balcony_quantized")
