"""The Lightning preset end to end on the tiny checkpoint: timesteps, 2+2 expert split, one forward per step."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from serve.worker.model_runner import ModelRunner
from tests.requests import make_params

# guidance 4.0/3.0 from the base: the preset must override both (distilled models run without CFG)
params = partial(make_params, num_inference_steps=40, seed=3, preset="lightning-4step")


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return ModelRunner.from_checkpoint(tiny_model_dir)


def record_forwards(runner: ModelRunner) -> tuple[list, list]:
    """Per forward call: (expert index, batch rows, timesteps passed). Returns (calls, hook handles)."""
    calls, handles = [], []
    for i, expert in enumerate(runner.denoise.experts):

        def hook(module, args, kwargs, i=i):
            calls.append((i, kwargs["hidden_states"].shape[0], kwargs["timestep"].tolist()))

        handles.append(expert.register_forward_pre_hook(hook, with_kwargs=True))
    return calls, handles


def test_lightning_is_four_single_forwards_two_per_expert(runner):
    calls, handles = record_forwards(runner)
    try:
        out = runner.generate(params())
    finally:
        for h in handles:
            h.remove()
    assert out.frames.shape == (5, 32, 32, 3)
    assert [(expert, rows) for expert, rows, _ in calls] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    timesteps = [t for _, _, (t,) in calls]
    assert timesteps == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], abs=1e-4)


def test_lightx2v_step_index_switch_gives_the_same_video(runner):
    """LightX2V switches experts at step index 2, Lightning at t < 875: same split, same frames."""
    (state,) = runner.start([params(preset="lightx2v-4step")])
    assert runner.experts_of(state) == (0, 0, 1, 1)
    torch.testing.assert_close(
        runner.decode_float(params(preset="lightx2v-4step")), runner.decode_float(params()), atol=0, rtol=0
    )


def test_a_preset_ignores_requested_steps_and_guidance(runner):
    a = runner.decode_float(params(num_inference_steps=40, guidance_scale=4.0))
    b = runner.decode_float(params(num_inference_steps=2, guidance_scale=7.0, guidance_scale_2=1.0))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
