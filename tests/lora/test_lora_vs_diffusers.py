"""LoRA fused at load, and applied per request, against diffusers' `load_lora_weights` (PEFT).

Tolerances. Weights: diffusers folds alpha/rank into lora_A and lora_B separately and PEFT adds
B@A in the weight dtype; we add (alpha/rank)*B@A in fp32. Both are fp32 roundings of the same sum
on weights of magnitude ~0.1-1, so they agree to a few ulps (~1e-7); 1e-6 is the issue's bound.
Frames: ATOL of the end-to-end oracle (tests/pipeline/test_oracle.py: 2e-5, 1/20 of an 8-bit
level): a fused weight and an unfused W x + B(A x) differ by float rounding only.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from serve.engine.request import GenerationParams
from serve.lora.options import FusedLora, LoraOptions
from serve.worker.model_runner import ModelRunner
from tests.lora.conftest import write_lora
from tests.requests import make_params

ATOL_FRAMES = 2e-5
ATOL_WEIGHTS = 1e-6
SCALES = (0.7, 1.3)  # high, low: different, so a LoRA fused into the wrong expert or scale shows


class LightningEuler(FlowMatchEulerDiscreteScheduler):
    """diffusers' own Euler with Lightning's sigmas: it shifts the uniform [1, .75, .5, .25] by 5 itself."""

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        super().set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], device=device)


params = partial(make_params, negative_prompt="", num_inference_steps=40, seed=7, preset="lightning-4step")


@pytest.fixture(scope="module")
def base_runner(tiny_model_dir):
    return ModelRunner.from_checkpoint(tiny_model_dir)


@pytest.fixture(scope="module")
def base_frames(base_runner):
    return base_runner.decode_float(params())


def make_lora_files(runner, root, fmt):
    high, low = runner.denoise.experts
    folder = root / "distill"  # Lightning's layout: one directory, one file per expert
    write_lora(folder / "high_noise_model.safetensors", high, fmt, seed=1)
    write_lora(folder / "low_noise_model.safetensors", low, fmt, seed=2)
    return root, folder / "high_noise_model.safetensors", folder / "low_noise_model.safetensors"


@pytest.fixture(scope="module", params=["original", "peft"])
def lora_files(request, base_runner, tmp_path_factory):
    return make_lora_files(base_runner, tmp_path_factory.mktemp(f"loras_{request.param}"), request.param)


@pytest.fixture(scope="module")
def original_lora_files(base_runner, tmp_path_factory):
    """Per-request tests use one format: key parsing is shared with the fused path, tested in both."""
    return make_lora_files(base_runner, tmp_path_factory.mktemp("loras_request"), "original")


def diffusers_pipe(model_dir, high, low, scales) -> WanPipeline:
    pipe = WanPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = LightningEuler(shift=5.0)
    pipe.load_lora_weights(str(high), adapter_name="high")
    pipe.load_lora_weights(str(low), adapter_name="low", load_into_transformer_2=True)
    pipe.transformer.set_adapters(["high"], [scales[0]])
    pipe.transformer_2.set_adapters(["low"], [scales[1]])
    return pipe


def diffusers_frames(pipe: WanPipeline, p: GenerationParams) -> torch.Tensor:
    out = pipe(
        p.prompt,
        height=p.height,
        width=p.width,
        num_frames=p.num_frames,
        num_inference_steps=4,
        guidance_scale=1.0,
        guidance_scale_2=1.0,
        generator=torch.Generator("cpu").manual_seed(p.seed),
        output_type="pt",
    )
    return out.frames[0].permute(0, 2, 3, 1)


def test_fused_lora_matches_diffusers_weights_and_frames(tiny_model_dir, base_runner, base_frames, lora_files):
    root, high, low = lora_files
    fused = (FusedLora(high, 0, SCALES[0]), FusedLora(low, 1, SCALES[1]))
    runner = ModelRunner.from_checkpoint(tiny_model_dir, lora=LoraOptions(lora_dirs=(root,), fused=fused))
    pipe = diffusers_pipe(tiny_model_dir, high, low, SCALES)

    ours = runner.decode_float(params())
    torch.testing.assert_close(ours, diffusers_frames(pipe, params()), atol=ATOL_FRAMES, rtol=0)
    # The LoRA matters: without it the frames are far from these (so the match above means something).
    assert (ours - base_frames).abs().max() > 1e-2

    pipe.fuse_lora(components=["transformer", "transformer_2"])
    pipe.unload_lora_weights()  # keeps the fused weights, drops the PEFT wrappers
    for ours_model, ref_model, base_model in zip(
        runner.denoise.experts, (pipe.transformer, pipe.transformer_2), base_runner.denoise.experts, strict=True
    ):
        ref, base = ref_model.state_dict(), base_model.state_dict()
        changed = 0
        for name, weight in ours_model.state_dict().items():
            torch.testing.assert_close(weight, ref[name], atol=ATOL_WEIGHTS, rtol=0, msg=name)
            changed += not torch.equal(weight, base[name])
        assert changed == len(ours_model.blocks) * 10  # the weight of every targeted Linear, nothing else


def test_per_request_lora_matches_diffusers_and_leaves_others_alone(tiny_model_dir, base_frames, original_lora_files):
    root, high, low = original_lora_files
    runner = ModelRunner.from_checkpoint(tiny_model_dir, lora=LoraOptions(lora_dirs=(root,)))
    pipe = diffusers_pipe(tiny_model_dir, high, low, (0.5, 0.5))
    ours = runner.decode_float(params(loras=(("distill", 0.5),)))
    torch.testing.assert_close(ours, diffusers_frames(pipe, params()), atol=ATOL_FRAMES, rtol=0)
    assert (ours - base_frames).abs().max() > 1e-2
    # Hooks are removed after each forward: the next request without a LoRA is the base model's.
    torch.testing.assert_close(runner.decode_float(params()), base_frames, atol=0, rtol=0)


def test_request_lora_without_lora_dir_is_refused(base_runner):
    with pytest.raises(ValueError, match="--lora-dir"):
        base_runner.decode_float(params(loras=(("distill", 1.0),)))
