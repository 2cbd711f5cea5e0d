"""reelserve against diffusers' WanPipeline on the same checkpoint, prompt, seed and settings.

Tolerance: fp32 on CPU. The two paths do the same arithmetic in a different order (reelserve runs
cond and uncond as one batch and encodes prompt and negative prompt together), so they differ by
float rounding only; measured max abs difference on decoded frames in [0, 1] is about 2e-6.
ATOL = 2e-5 leaves 10x headroom and is still 1/20 of one 8-bit level (1/255 = 3.9e-3).
"""

from functools import partial

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline

from models.tiny import write_tiny_checkpoint
from serve.engine.request import GenerationParams
from serve.sampling.flow import flow_sigmas
from serve.worker.model_runner import ModelRunner
from tests.requests import make_params

ATOL = 2e-5


params = partial(
    make_params, negative_prompt="blurry, static", height=64, width=48, num_frames=9, seed=1234, sampler="unipc"
)


class EulerOnFlowSigmas(FlowMatchEulerDiscreteScheduler):
    """diffusers' Euler stepping on the checkpoint's shifted flow sigmas (WanPipeline cannot pass
    sigmas itself, and diffusers' own `shift` on this class re-shifts an already shifted grid)."""

    wan_flow_shift = 3.0

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        sigmas = flow_sigmas(num_inference_steps, self.wan_flow_shift)[:-1].tolist()
        super().set_timesteps(sigmas=sigmas, device=device)


def reference_frames(pipe: WanPipeline, p: GenerationParams) -> torch.Tensor:
    if p.sampler == "euler":
        euler = EulerOnFlowSigmas(shift=1.0)
        euler.wan_flow_shift = pipe.scheduler.config.flow_shift
        pipe.scheduler = euler
    out = pipe(
        p.prompt,
        negative_prompt=p.negative_prompt,
        height=p.height,
        width=p.width,
        num_frames=p.num_frames,
        num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        guidance_scale_2=p.guidance_scale_2 if pipe.config.boundary_ratio else None,
        generator=torch.Generator("cpu").manual_seed(p.seed),
        output_type="pt",
    )
    return out.frames[0].permute(0, 2, 3, 1)  # (F, 3, H, W) -> (F, H, W, 3)


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return ModelRunner.from_checkpoint(tiny_model_dir)


@pytest.fixture
def pipe(tiny_model_dir):
    pipe = WanPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_expert_calls(runner: ModelRunner) -> list[int]:
    calls = [0] * len(runner.denoise.experts)
    for i, expert in enumerate(runner.denoise.experts):
        expert.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("sampler", ["unipc", "euler"])
def test_two_experts_match_diffusers(runner, pipe, sampler):
    p = params(sampler=sampler)
    ours = runner.decode_float(p)
    ref = reference_frames(pipe, p)
    assert ours.shape == ref.shape == (9, 64, 48, 3)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("cfg_mode", "forwards_per_step"), [("batched", 1), ("sequential", 2)])
def test_boundary_falls_mid_schedule_and_each_step_is_one_forward_per_cfg_pass(
    tiny_model_dir, cfg_mode, forwards_per_step
):
    runner = ModelRunner.from_checkpoint(tiny_model_dir)
    runner.denoise.set_activation_plan(cfg_mode, 1)
    calls = count_expert_calls(runner)
    runner.generate(params())
    # 4 UniPC steps at shift 3: t = 999, 900 (>= 875, high noise) then 750, 500 (low noise);
    # cond and uncond share one forward pass, or take one each (sequential, a CPU's default).
    assert calls == [2 * forwards_per_step, 2 * forwards_per_step]


def test_guidance_scale_2_only_affects_the_low_noise_expert(runner, pipe):
    p = params(guidance_scale_2=1.5)
    torch.testing.assert_close(runner.decode_float(p), reference_frames(pipe, p), atol=ATOL, rtol=0)
    assert not torch.allclose(runner.decode_float(p), runner.decode_float(params()), atol=1e-3)


def test_without_guidance_matches_diffusers(runner, pipe):
    p = params(guidance_scale=1.0, guidance_scale_2=1.0)
    torch.testing.assert_close(runner.decode_float(p), reference_frames(pipe, p), atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def wan21_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("wan21"), two_experts=False)


@pytest.mark.parametrize("sampler", ["unipc", "euler"])
def test_wan21_single_expert_matches_diffusers(wan21_dir, sampler):
    runner = ModelRunner.from_checkpoint(wan21_dir)
    pipe = WanPipeline.from_pretrained(wan21_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer_2 is None and isinstance(pipe.scheduler, UniPCMultistepScheduler)
    p = params(sampler=sampler, guidance_scale_2=4.0)
    torch.testing.assert_close(runner.decode_float(p), reference_frames(pipe, p), atol=ATOL, rtol=0)


def test_seed_changes_the_video(runner):
    assert not torch.allclose(runner.decode_float(params(seed=1)), runner.decode_float(params(seed=2)), atol=1e-3)
