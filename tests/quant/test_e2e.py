"""End to end on the tiny checkpoint: quantized frames against the unquantized ones, same seed.

Measured here (fp32 on CPU, 64x64x9, 4 UniPC steps with CFG), PSNR of decoded frames in [0, 1]:
int8-wo 78.7 dB, w8a8-int8 68.5, fp8-wo 64.0, w8a8-fp8 58.4; latent cosine > 0.9999 for all.
Thresholds are those minus 6 dB (twice the RMS error), all far above 40 dB, the usual "visually
lossless" bar. They are regression guards, and they do catch real degradation: rounding the int8
weights to 4 significant bits gives 53.3 dB and fails every int8 and fp8-wo bar. They do NOT tell
per-token from per-tensor activation scales (66.7 dB): this random-weight model has no outlier
tokens, so that property is tested on the layer (test_linear.py, 100x token).
The tiny model is hidden 24; `bench/quant_quality.py` repeats this at hidden 768 ("bench" size).
"""

import copy

import pytest
import torch

from serve.engine.request import GenerationParams
from serve.quant import Fp8Linear, QuantConfig, quantize_module
from serve.worker.model_runner import ModelRunner
from tests.requests import make_params

PSNR_DB = {"int8-wo": 72.0, "w8a8-int8": 62.0, "fp8-wo": 58.0, "w8a8-fp8": 52.0}
COSINE = 0.999
PARAMS = make_params(negative_prompt="blurry, static", height=64, width=64, num_frames=9, seed=1234)


def final_latents(runner: ModelRunner, params: GenerationParams) -> torch.Tensor:
    (state,) = runner.start([params])
    for expert in runner.experts_of(state):
        runner.denoise_step([state], expert)
    return state.latents


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1.0 / ((a - b) ** 2).mean()))


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return ModelRunner.from_checkpoint(tiny_model_dir)


@pytest.fixture(scope="module")
def reference(runner):
    latents = final_latents(runner, PARAMS)
    return latents, runner.decode(latents)


@pytest.mark.parametrize("scheme", list(PSNR_DB))
def test_quantized_generation_stays_close(runner, reference, scheme):
    floats = runner.denoise.experts
    quantized = [copy.deepcopy(e) for e in floats]
    for expert in quantized:
        quantize_module(expert, QuantConfig(scheme))
        for layer in expert.modules():
            if isinstance(layer, Fp8Linear):
                layer.force_scaled_mm = True  # measure W8A8 fp8 numerics as a GPU runs them
    runner.denoise.experts = quantized
    try:
        latents = final_latents(runner, PARAMS)
        frames = runner.decode(latents)
    finally:
        runner.denoise.experts = floats
    ref_latents, ref_frames = reference
    cosine = torch.nn.functional.cosine_similarity(latents.flatten(), ref_latents.flatten(), dim=0)
    assert psnr(frames, ref_frames) >= PSNR_DB[scheme]
    assert cosine >= COSINE
    assert not torch.equal(frames, ref_frames)  # the quantized layers did run
