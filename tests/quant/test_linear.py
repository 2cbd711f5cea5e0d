"""Each quantized linear against the float one on random inputs, with an error bound per scheme.

Inputs are "well scaled": x ~ N(0, 1), weights from nn.Linear's uniform init. Measured relative
errors ||y_q - y|| / ||y|| (K=512, N=256, 256 tokens, 5 seeds, worst): int8-wo 0.39%, w8a8-int8
0.84%, fp8-wo 2.6%, w8a8-fp8 3.7%. Why: an int8 step is absmax/127, and for a uniform row the
rounding noise is step/sqrt(12) = 0.39% of the row's RMS, so weight-only int8 sits there and W8A8
adds the same again for activations (Gaussian rows have a larger absmax/RMS). e4m3 keeps 3 mantissa
bits: relative rounding error up to 2^-4, about 2.5% RMS. Bounds below are about 2x the
measurement, and W8A8 int8 stays under the 2% the issue asks for.
"""

import pytest
import torch
from torch import nn

from serve.quant import Fp8Linear, QuantLinear
from serve.quant.ops import FP8, fp8_scaled_mm, int8_matmul, int8_matmul_fallback, quantize_rows, quantize_weight

BOUNDS = {"int8-wo": 0.01, "w8a8-int8": 0.02, "fp8-wo": 0.05, "w8a8-fp8": 0.07}
K, N, TOKENS = 512, 256, 256


def rel_err(y: torch.Tensor, ref: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (y.float() - ref).norm() / ref.norm()
    return (y.float() - ref).norm(dim=dim) / ref.norm(dim=dim)


def quantized(linear: nn.Linear, scheme: str) -> QuantLinear:
    layer = QuantLinear.from_linear(linear, scheme)
    if isinstance(layer, Fp8Linear):
        layer.force_scaled_mm = True  # the W8A8 fp8 path a GPU takes; torch's CPU build runs it too
    return layer


@pytest.fixture(scope="module")
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(K, N)


@pytest.mark.parametrize("scheme", list(BOUNDS))
def test_error_bound_on_well_scaled_inputs(linear, scheme):
    layer = quantized(linear, scheme)
    for seed in range(3):
        x = torch.randn(2, TOKENS // 2, K, generator=torch.Generator().manual_seed(seed))  # 3-D: (batch, tokens, K)
        y = layer(x)
        assert y.shape == (2, TOKENS // 2, N) and y.dtype == torch.float32
        assert rel_err(y, linear(x)) < BOUNDS[scheme]


@pytest.mark.parametrize("scheme", list(BOUNDS))
def test_bf16_activations_keep_bound_and_storage(linear, scheme):
    layer = quantized(linear, scheme).to(torch.bfloat16)
    # .to(bf16) casts only the bias: the quantized weight and its fp32 scale are moved, never cast.
    assert layer.weight.dtype in (torch.int8, FP8) and layer.weight_scale.dtype == torch.float32
    x = torch.randn(TOKENS, K, generator=torch.Generator().manual_seed(7))
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert rel_err(y, linear(x)) < BOUNDS[scheme] + 0.01  # + bf16 rounding of inputs and output (2^-8 each)


def per_tensor_w8a8(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """What a static per-tensor activation scale gives: the negative control of the outlier test."""
    scale = x.abs().max() / 127
    return linear((x / scale).round().clamp(-127, 127) * scale)


@pytest.mark.parametrize("scheme", ["w8a8-int8", "w8a8-fp8"])
def test_per_token_scales_survive_a_100x_token(linear, scheme):
    x = torch.randn(64, K, generator=torch.Generator().manual_seed(3))
    x[5] *= 100.0
    ref = linear(x)
    per_token = rel_err(quantized(linear, scheme)(x), ref, dim=1)
    assert per_token.max() < BOUNDS[scheme], f"worst token {int(per_token.argmax())}: {float(per_token.max()):.3f}"
    # The same check fails for a per-tensor scale: the 99% of normal tokens are quantized with a
    # step set by the outlier (measured ~88% error), so this test does tell the two apart.
    normal = torch.arange(64) != 5
    assert rel_err(per_tensor_w8a8(linear, x), ref, dim=1)[normal].max() > 0.2


def test_int8_matmul_is_exact_on_both_paths():
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (33, 520), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (72, 520), generator=gen, dtype=torch.int8)
    exact = (a.long() @ b.long().t()).int()
    assert torch.equal(int8_matmul(a, b.t()), exact)  # torch._int_mm on this CPU build
    assert torch.equal(int8_matmul_fallback(a, b.t()), exact)  # K=520 < 1040: fp32 holds every sum exactly


def test_scaled_mm_matches_dequantized_product():
    gen = torch.Generator().manual_seed(2)
    x_q, x_scale = quantize_rows(torch.randn(32, 64, generator=gen), FP8)
    w_q, w_scale = quantize_weight(torch.randn(48, 64, generator=gen), FP8)
    expected = (x_q.float() * x_scale) @ (w_q.float() * w_scale[:, None]).t()
    got = fp8_scaled_mm(x_q, x_scale, w_q, w_scale, torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)  # the same numbers, summed in another order


def test_weight_quantization_is_per_output_channel():
    w = torch.randn(4, 64)
    w[2] *= 1000.0  # one loud output channel must not coarsen the others
    q, scale = quantize_weight(w, torch.int8)
    assert q.dtype == torch.int8 and scale.shape == (4,)
    assert torch.equal(q.abs().amax(dim=1), torch.full((4,), 127, dtype=torch.int8))
    assert rel_err(q.float() * scale[:, None], w, dim=1).max() < 0.01


def test_zero_rows_give_zeros_not_nan():
    for storage in (torch.int8, FP8):
        q, scale = quantize_rows(torch.zeros(3, 16), storage)
        assert torch.isfinite(scale).all() and (q.float() == 0).all()
    layer = QuantLinear.from_linear(nn.Linear(16, 8), "w8a8-int8")
    assert torch.isfinite(layer(torch.zeros(2, 16))).all()
