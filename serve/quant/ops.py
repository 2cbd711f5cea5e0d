"""Quantize tensors and multiply quantized ones; every device-specific kernel sits in one small function.

Weights get one symmetric scale per output channel, activations one per token (row), both
absmax-based: ViDiT-Q's point is that DiT activations vary strongly across tokens, CFG branches
and timesteps, and a per-token scale computed at run time absorbs all three without calibration.
"""

from __future__ import annotations

import torch

INT8_MAX = 127.0
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
# Smallest scale: an all-zero row quantizes to zeros instead of dividing by zero.
MIN_SCALE = 1e-12


def absmax_scale(x: torch.Tensor, qmax: float) -> torch.Tensor:
    """fp32 scale per row of a 2-D tensor, shape (rows, 1): row absmax maps to `qmax`."""
    return (x.abs().amax(dim=-1, keepdim=True).float() / qmax).clamp(min=MIN_SCALE)


def quantize_rows(x: torch.Tensor, storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of a 2-D tensor to int8 or fp8 e4m3; returns (q, scale (rows, 1))."""
    x = x.float()
    if storage == torch.int8:
        scale = absmax_scale(x, INT8_MAX)
        return (x / scale).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale
    if storage == FP8:
        scale = absmax_scale(x, FP8_MAX)
        return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale
    raise ValueError(f"cannot quantize to {storage}; use torch.int8 or torch.float8_e4m3fn")


def quantize_weight(weight: torch.Tensor, storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (q (out, in), fp32 scale (out,)); one scale per output channel."""
    q, scale = quantize_rows(weight, storage)
    return q, scale.squeeze(1)


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (K, N) -> int32 (M, N), exactly.

    `torch._int_mm` runs on CPU in torch 2.13 for any shape (measured 3.6x faster than an fp32
    matmul at 4096x3072x768 on this machine); on CUDA it needs M > 16 and K, N multiples of 8.
    Elsewhere the product is taken in fp32, exact while K * 127^2 < 2^24 (K <= 1040) and
    within fp32 rounding beyond.
    """
    if _int_mm_ok(a, b_t):
        return torch._int_mm(a, b_t)
    return int8_matmul_fallback(a, b_t)


def int8_matmul_fallback(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """The same product through an fp32 matmul, for devices or shapes `_int_mm` does not take."""
    return (a.float() @ b_t.float()).round_().to(torch.int32)


def _int_mm_ok(a: torch.Tensor, b_t: torch.Tensor) -> bool:
    if a.device.type == "cpu":
        return True
    if a.device.type == "cuda":
        m, k = a.shape
        return m > 16 and k % 8 == 0 and b_t.shape[1] % 8 == 0
    return False


def fp8_matmul_supported(device: torch.device) -> bool:
    """fp8 tensor cores: CUDA compute capability 8.9 (Ada) or newer; H100 is 9.0."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_scaled_mm(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """fp8 (M, K) x fp8 (N, K) with row-wise scales -> (M, N) in `out_dtype`, via `torch._scaled_mm`.

    Row-wise scaling takes scale_a (M, 1) and scale_b (1, N) in fp32 and, on CUDA, a bf16 output;
    `w_q.t()` of a contiguous (N, K) weight is the column-major operand the kernel wants. The
    CPU build of torch 2.13 also implements it (slowly), which is how the tests check this path.
    """
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=out_dtype)


def scaled_mm_shapes_ok(x_q: torch.Tensor, w_q: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """CUDA's fp8 GEMM needs K and N multiples of 16, and row-wise scales need a bf16 output."""
    return x_q.shape[1] % 16 == 0 and w_q.shape[0] % 16 == 0 and out_dtype == torch.bfloat16
