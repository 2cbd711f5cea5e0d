import pytest
import torch
from diffusers import UniPCMultistepScheduler

from serve.sampling.flow import EulerSampler, flow_sigmas, make_sampler
from serve.sampling.guidance import split_cfg

CONFIG = dict(UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0).config)


@pytest.mark.parametrize("steps", [2, 4, 40])
def test_flow_sigmas_match_diffusers_unipc_schedule(steps):
    ref = UniPCMultistepScheduler.from_config(CONFIG)
    ref.set_timesteps(steps)
    ours = flow_sigmas(steps, 3.0)
    # diffusers subtracts 1e-6 from the first sigma; everything else is the same formula.
    torch.testing.assert_close(ours, ref.sigmas.float(), atol=2e-6, rtol=0)
    assert ours[-1] == 0 and len(ours) == steps + 1


def test_euler_integrates_a_constant_velocity_exactly():
    sampler = EulerSampler(flow_sigmas(5, 3.0))
    x = torch.zeros(3)
    v = torch.ones(3)
    for _ in sampler.timesteps:
        x = sampler.step(v, x)
    # sum of (sigma_{i+1} - sigma_i) = 0 - 1
    torch.testing.assert_close(x, -torch.ones(3))


def test_samplers_are_independent_per_request():
    a, b = make_sampler("unipc", CONFIG, 4), make_sampler("unipc", CONFIG, 4)
    x = torch.randn(2, 3)
    a.step(torch.ones_like(x), x)
    # b has not stepped: its first step must match a fresh sampler's first step
    fresh = make_sampler("unipc", CONFIG, 4)
    torch.testing.assert_close(b.step(torch.ones_like(x), x), fresh.step(torch.ones_like(x), x))


def test_unknown_sampler_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        make_sampler("ddim", CONFIG, 4)


def test_split_cfg_is_uncond_plus_scaled_difference():
    cond, uncond = torch.full((1, 2), 3.0), torch.full((1, 2), 1.0)
    torch.testing.assert_close(split_cfg(torch.cat([cond, uncond]), 4.0), torch.full((1, 2), 9.0))
