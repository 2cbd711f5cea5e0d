"""The activation estimate the planner and `reelserve inspect` use, against the live bytes of diffusers'
own Wan transformer running on the CPU (bf16 activations, as on a GPU), and the meter itself.

The transformer is A14B's block with fewer heads: head_dim 128 and the FFN/hidden ratio 2.7 of
A14B, so the per-token-channel terms of the estimate are A14B's; 4096 tokens against 512 text
tokens. Tolerance: the estimate must never be below the measurement (the planner would overcommit)
and at most 10% above it (measured: 3-9% above); with TI2V's per-token timesteps at most 15% above
(measured: 5% whole, 10.5% chunked, where the estimate counts the block entry's fp32 modulation
copies on top of the whole-sequence buffers).
"""

import pytest
import torch

from bench.activation_memory import FFN, HEAD_DIM, HEADS, build
from models.wan.chunked_block import set_block_chunks
from serve.loader.activation_meter import LiveBytes, peak_live_bytes
from serve.loader.memory_model import denoise_activation_bytes

LATENT = (16, 4, 64, 64)  # 4 x 32 x 32 = 4096 tokens after the (1, 2, 2) patch
TOKENS = 4 * 32 * 32
HEADROOM = 1.10
PER_TOKEN_HEADROOM = 1.15


@pytest.fixture(scope="module")
def transformer() -> torch.nn.Module:
    return build(num_layers=1)


@pytest.mark.parametrize(
    ("rows", "chunks", "per_token"),
    [(1, 1, False), (2, 1, False), (1, 4, False), (2, 4, False), (1, 1, True), (1, 4, True)],
)
def test_estimate_bounds_the_measured_peak(transformer, rows, chunks, per_token) -> None:
    timestep = torch.rand(rows, TOKENS) * 1000 if per_token else torch.full((rows,), 500.0)
    inputs = dict(
        hidden_states=torch.randn(rows, *LATENT, dtype=torch.bfloat16),
        timestep=timestep,
        encoder_hidden_states=torch.randn(rows, 512, 64, dtype=torch.bfloat16),
        return_dict=False,
    )
    set_block_chunks(transformer, chunks)
    try:
        with torch.inference_mode():
            measured = peak_live_bytes(transformer, **inputs)
    finally:
        set_block_chunks(transformer, 1)
    predicted = denoise_activation_bytes(TOKENS, HEADS * HEAD_DIM, FFN, HEAD_DIM, rows, chunks, per_token)
    headroom = PER_TOKEN_HEADROOM if per_token else HEADROOM
    assert measured <= predicted <= headroom * measured, (measured, predicted)


def test_chunks_and_sequential_cfg_lower_the_estimate() -> None:
    a14b_720p = dict(tokens=75_600, hidden=5120, ffn=13824, head_dim=128)
    batched, sequential = (denoise_activation_bytes(**a14b_720p, rows=r) for r in (2, 1))
    chunked = denoise_activation_bytes(**a14b_720p, rows=1, chunks=4)
    assert batched > sequential > chunked
    assert 2 * sequential - batched == 75_600 * 128 * 8  # rows share one RoPE table


def test_meter_counts_allocations_not_views() -> None:
    meter = LiveBytes()
    base = torch.zeros(1000)  # made before the meter: not counted
    with meter:
        a = torch.ones(1000)  # 4000 bytes
        view = a[:10]  # a view: no allocation
        a.add_(1)  # in place: no allocation
        b = base * 2  # 4000 bytes
        del b
        c = torch.ones(250)  # 1000 bytes, after b was freed
    assert meter.peak == 8000 and meter.live == 5000
    del a, view, c
    assert meter.live == 0
