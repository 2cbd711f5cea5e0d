"""Drop-in replacements for `nn.Linear` holding an int8 or fp8 weight plus one fp32 scale per output channel.

State-dict names are `weight` (int8 / float8_e4m3fn, shape (out, in) as in nn.Linear), `weight_scale`
(fp32, (out,)) and `bias` (float, unquantized): a pre-quantized checkpoint is just these tensors.
Weight and scale are buffers, not parameters: they are never trained, and integer tensors cannot
be `requires_grad` parameters anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serve.quant.ops import (
    FP8,
    fp8_matmul_supported,
    fp8_scaled_mm,
    int8_matmul,
    quantize_rows,
    quantize_weight,
    scaled_mm_shapes_ok,
)
from serve.quant.schemes import SCHEMES, Scheme


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored quantized; subclasses choose the matmul."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        scheme: Scheme,
        bias_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=scheme.storage, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        bias_t = torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None
        self.bias = None if bias_t is None else nn.Parameter(bias_t, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme_name: str) -> QuantLinear:
        """Quantize an existing float layer (tests, benchmarks); the loader quantizes while streaming instead."""
        spec = SCHEMES[scheme_name]
        layer = make_quant_linear(
            spec, linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype, "meta"
        )
        q, scale = quantize_weight(linear.weight.detach().cpu(), spec.storage)
        layer.set_quantized(q.to(linear.weight.device), scale.to(linear.weight.device))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def set_quantized(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        self._buffers["weight"], self._buffers["weight_scale"] = weight, scale

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.weight_scale.to(dtype).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = self._matmul(rows)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        # Dequantize, then multiply: scaling the output instead would save one pass over the
        # weight but lets fp16 overflow (sum of 127 * |x| over K = 5120 inputs exceeds 65504).
        return F.linear(x, self.dequantized_weight(x.dtype))

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` must move the quantized weight and its scale, never cast them:
        # an fp8 weight is a floating tensor (nn.Module.to would make it bf16, doubling its bytes)
        # and an fp32 scale would lose precision. `fn` is opaque, so probe it for the target device.
        kept = {name: self._buffers.pop(name) for name in ("weight", "weight_scale")}
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=kept["weight"].device)).device
        self._buffers.update({name: t.to(device) for name, t in kept.items()})
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"


class Int8W8A8Linear(QuantLinear):
    """int8 weights and int8 activations with one scale per token, computed at run time."""

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        x_q, x_scale = quantize_rows(x, torch.int8)
        acc = int8_matmul(x_q, self.weight.t())
        return (acc.float() * x_scale * self.weight_scale).to(x.dtype)


class Fp8Linear(QuantLinear):
    """fp8 e4m3 weights; with `w8a8-fp8` on sm89+ GPUs, fp8 per-token activations through `_scaled_mm`."""

    force_scaled_mm: bool = False
    """Run `_scaled_mm` even where `fp8_matmul_supported` says no (the CPU build has it; tests and the
    quality report use this to measure W8A8 fp8 numerics without a GPU)."""

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme.quantize_activations and self._scaled_mm_usable(x):
            x_q, x_scale = quantize_rows(x, FP8)
            return fp8_scaled_mm(x_q, x_scale, self.weight, self.weight_scale, x.dtype)
        return super()._matmul(x)

    def _scaled_mm_usable(self, x: torch.Tensor) -> bool:
        if self.force_scaled_mm:
            return True
        return fp8_matmul_supported(x.device) and scaled_mm_shapes_ok(x, self.weight, x.dtype)


def make_quant_linear(
    scheme: Scheme,
    in_features: int,
    out_features: int,
    bias: bool,
    bias_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> QuantLinear:
    """The layer class for `scheme`, with uninitialised weight and scale (the loader fills them)."""
    if scheme.storage == FP8:
        return Fp8Linear(in_features, out_features, bias, scheme, bias_dtype, device)
    cls = Int8W8A8Linear if scheme.quantize_activations else QuantLinear
    return cls(in_features, out_features, bias, scheme, bias_dtype, device)
