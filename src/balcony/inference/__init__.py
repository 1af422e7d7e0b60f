"""Decoding on a Balcony model: the engine at one budget, self-speculative decoding, sampling, the KV cache, quantization."""

from .engine import decode_one_token, generate, generate_stream, prefill
from .options import DecodeOptions, DraftOptions, ExitPolicy
from .quantize import quantize_model
from .sampling import SamplingConfig, sample
from .speculative import SpeculativeStats, speculative_generate, speculative_stream
from .token_exits import TokenExitStats, token_exit_generate, token_exit_stream

__all__ = [
    "DecodeOptions", "DraftOptions", "ExitPolicy", "TokenExitStats", "token_exit_generate", "token_exit_stream", "SamplingConfig", "SpeculativeStats", "decode_one_token", "generate",
    "generate_stream", "prefill", "quantize_model", "sample", "speculative_generate", "speculative_stream",
]
