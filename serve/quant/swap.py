"""Which `nn.Linear` layers of a module get quantized, and swapping them for quantized layers."""

from __future__ import annotations

import torch
from torch import nn

from serve.quant.linear import QuantLinear, make_quant_linear
from serve.quant.schemes import QuantConfig, Scheme


def eligible_linears(module: nn.Module, config: QuantConfig, keep_fp32: frozenset[str] = frozenset()) -> list[str]:
    """Names of the `nn.Linear` layers `config` quantizes: not skipped, and not inside a module the
    class keeps in fp32 (`_keep_in_fp32_modules`, e.g. Wan's time_embedder): the class asks for
    precision there, so we do not take it away."""
    names = []
    for name, sub in module.named_modules():
        if type(sub) is nn.Linear and not config.skips(name) and not keep_fp32.intersection(name.split(".")):
            names.append(name)
    return names


def swap_linears(
    module: nn.Module, names: list[str], scheme_of: dict[str, Scheme] | Scheme, bias_dtype: torch.dtype
) -> dict[str, QuantLinear]:
    """Replace each named `nn.Linear` by an empty quantized layer on the meta device (nothing allocated)."""
    swapped = {}
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        old = parent._modules[leaf]
        spec = scheme_of if isinstance(scheme_of, Scheme) else scheme_of[name]
        new = make_quant_linear(spec, old.in_features, old.out_features, old.bias is not None, bias_dtype, "meta")
        parent._modules[leaf] = new
        swapped[name] = new
    return swapped


def quantize_module(module: nn.Module, config: QuantConfig) -> dict[str, QuantLinear]:
    """Quantize an already loaded float module in place (benchmarks and tests; serving quantizes while loading)."""
    swapped = {}
    for name in eligible_linears(module, config, frozenset(getattr(module, "_keep_in_fp32_modules", None) or ())):
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        parent._modules[leaf] = swapped[name] = QuantLinear.from_linear(parent._modules[leaf], config.scheme)
    return swapped


def held_bytes(module: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer the module holds (what it costs on its device)."""
    seen: dict[int, torch.Tensor] = {}
    for t in (*module.parameters(), *module.buffers()):
        seen.setdefault(id(t), t)
    return sum(t.numel() * t.element_size() for t in seen.values())


def quantized_schemes(module: nn.Module) -> dict[str, int]:
    """Scheme name -> number of quantized layers in `module` ("none" if it has none)."""
    counts: dict[str, int] = {}
    for sub in module.modules():
        if isinstance(sub, QuantLinear):
            counts[sub.scheme.name] = counts.get(sub.scheme.name, 0) + 1
    return counts or {"none": 0}
