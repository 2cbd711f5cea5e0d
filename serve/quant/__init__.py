"""Quantized inference: int8 / fp8 weights with per-channel scales, W8A8 with dynamic per-token activations.

Typical use: `load_component(dir, "cuda:0", torch.bfloat16, quant=QuantConfig("w8a8-int8"))` quantizes
while streaming from disk; `QuantPolicy.parse("high=w8a8-int8,low=none")` gives the per-expert policy;
`serve.quant.convert.quantize_checkpoint` writes a pre-quantized checkpoint the loader reads directly.
"""

from serve.quant.linear import Fp8Linear, Int8W8A8Linear, QuantLinear
from serve.quant.schemes import DEFAULT_SKIP, SCHEMES, QuantConfig, QuantPolicy
from serve.quant.swap import held_bytes, quantize_module, quantized_schemes

__all__ = [
    "DEFAULT_SKIP",
    "SCHEMES",
    "Fp8Linear",
    "Int8W8A8Linear",
    "QuantConfig",
    "QuantLinear",
    "QuantPolicy",
    "held_bytes",
    "quantize_module",
    "quantized_schemes",
]
