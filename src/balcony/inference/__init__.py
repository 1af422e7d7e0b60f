"""Decoding on a Balcony model: the engine at one budget, self-speculative decoding, sampling, the KV cache, quantization."""

from .engine import decode_one_token, generate, generate_stream, prefill
from .options import DecodeOptions, DraftOptions
from .quantize import quantize_model
from .sampling import SamplingConfig, sample
from .speculative import SpeculativeStats, speculative_generate, speculative_stream

__all__ = [
    "DecodeOptions", "DraftOptions", "SamplingConfig", "SpeculativeStats", "decode_one_token", "generate",
    "generate_stream", "prefill", "quantize_model", "sample", "speculative_generate", "speculative_stream",
]
