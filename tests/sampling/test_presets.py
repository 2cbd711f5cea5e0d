"""Few-step presets: the published timesteps, diffusers' Euler on them, and how a preset rewrites a request."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from serve.sampling.flow import explicit_sampler, sampler_for
from serve.sampling.presets import PRESETS, apply_preset, get_preset
from tests.requests import make_params

LIGHTNING_TIMESTEPS = [1000.0, 937.5, 2500.0 / 3, 625.0]  # ModelTC/LightX2V-Wan2.2-Lightning#3


params = partial(
    make_params, prompt="p", negative_prompt="n", height=64, width=64, num_frames=9, num_inference_steps=40
)


@pytest.mark.parametrize("name", ["lightning-4step", "lightx2v-4step"])
def test_lightning_timesteps_are_the_published_ones(name):
    assert get_preset(name).timesteps() == pytest.approx(LIGHTNING_TIMESTEPS, abs=1e-9)
    sampler = sampler_for(params(preset=name), {})
    # float32 on the transformer side: 833.333 is not representable exactly.
    torch.testing.assert_close(sampler.timesteps, torch.tensor(LIGHTNING_TIMESTEPS), atol=1e-4, rtol=0)


def test_fastwan_3step_is_its_step_list_shifted_by_8():
    # By hand: 8s / (1 + 7s) for s = 1, 0.757, 0.522.
    assert get_preset("fastwan-3step").timesteps() == pytest.approx([1000.0, 961.4224, 897.2926], abs=1e-3)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_euler_steps_match_diffusers_flow_match_euler(name):
    """diffusers shifts the unshifted step list itself: an independent check of sigmas and updates."""
    preset = get_preset(name)
    ref = FlowMatchEulerDiscreteScheduler(shift=preset.shift)
    ref.set_timesteps(sigmas=[t / 1000 for t in preset.step_list])
    ours = explicit_sampler(preset.sigmas())
    torch.testing.assert_close(ours.timesteps, ref.timesteps, atol=1e-4, rtol=0)
    gen = torch.Generator().manual_seed(0)
    x_ours = x_ref = torch.randn(2, 3, generator=gen)
    for t in ref.timesteps:
        v = torch.randn(2, 3, generator=gen)
        x_ours = ours.step(v, x_ours)
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
    torch.testing.assert_close(x_ours, x_ref, atol=1e-6, rtol=0)


def test_apply_preset_sets_steps_euler_and_turns_guidance_off():
    resolved = apply_preset(params(preset="lightning-4step"))
    assert (resolved.num_inference_steps, resolved.sampler, resolved.uses_cfg) == (4, "euler", False)
    assert apply_preset(resolved) == resolved  # idempotent: the API and the worker may both apply it
    assert apply_preset(params()) == params()  # no preset, no change


def test_unknown_preset_and_bad_sigmas_are_clear_errors():
    with pytest.raises(ValueError, match="unknown preset 'turbo'; choose one of"):
        apply_preset(params(preset="turbo"))
    with pytest.raises(ValueError, match="decrease strictly and end at 0"):
        explicit_sampler([1.0, 0.5, 0.6, 0.0])
    with pytest.raises(ValueError, match="decrease strictly and end at 0"):
        explicit_sampler([1.0, 0.5])


def test_presets_import_no_torch():
    """The API and the scheduler resolve presets; they must not pull torch in."""
    import subprocess
    import sys

    code = "import sys, serve.sampling.presets; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
