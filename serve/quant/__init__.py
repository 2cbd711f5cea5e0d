"""Quantized inference: int8 / fp8 weights with per-channel scales, W8A8 with dynamic per-token activations.

Typical use: `load_component(dir, "cuda:0", torch.bfloat16, quant=QuantConfig("w8a8-int8"))` quantizes
while streaming from disk; `QuantPolicy.parse("high=w8a8-int8,low=none")` gives the per-expert policy;
`serve.quant.convert.quantize_checkpoint` writes a pre-quantized checkpoint the loader reads directly.
"""

# Exports load on first use: the package's torch-free config module (`serve.quant.config`) must import
# without pulling torch into the API process.
from serve.lazy import lazy_exports

_EXPORTS = {
    "DEFAULT_SKIP": "serve.quant.schemes",
    "Fp8Linear": "serve.quant.linear",
    "Int8W8A8Linear": "serve.quant.linear",
    "QuantConfig": "serve.quant.schemes",
    "QuantLinear": "serve.quant.linear",
    "QuantPolicy": "serve.quant.schemes",
    "SCHEMES": "serve.quant.schemes",
    "held_bytes": "serve.quant.swap",
    "quantize_module": "serve.quant.swap",
    "quantized_schemes": "serve.quant.swap",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
