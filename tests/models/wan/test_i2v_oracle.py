"""reelserve's Wan2.2 I2V-A14B path against diffusers' WanImageToVideoPipeline (tests/models/wan/reference.py).

Same checkpoint ("i2v-a14b" tiny layout), prompt, image, seed and settings; fp32 on CPU, so the two
differ by float rounding only and the T2V oracle's tolerance applies (ATOL 2e-5, see
tests/pipeline/test_oracle.py). The size is not square so that a height/width mix-up in the image
path cannot pass.
"""

import functools
from functools import partial

import pytest
import torch

from models.tiny import write_tiny_checkpoint
from serve.worker.model_runner import ModelRunner
from tests.models.wan.reference import (
    ATOL,
    i2v_a14b_frames,
    i2v_a14b_pipeline,
    make_condition_image,
    record_transformer_calls,
)
from tests.requests import make_params

HEIGHT, WIDTH, FRAMES = 64, 48, 9

IMAGE = make_condition_image(WIDTH, HEIGHT)
OTHER_IMAGE = make_condition_image(WIDTH, HEIGHT, square_rgb=(20, 200, 60), square_at=(0.45, 0.5))

params = partial(
    make_params,
    prompt="a red square moving left",
    negative_prompt="blurry, static",
    height=HEIGHT,
    width=WIDTH,
    num_frames=FRAMES,
    num_inference_steps=4,
    guidance_scale=4.0,
    guidance_scale_2=3.0,
    seed=1234,
    image=IMAGE,
)


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("i2v") / "i2v-a14b", layout="i2v-a14b")


@pytest.fixture(scope="module")
def pipe(i2v_dir):
    return i2v_a14b_pipeline(i2v_dir)


@pytest.fixture(scope="module")
def runner(i2v_dir):
    return ModelRunner.from_checkpoint(i2v_dir)


# Each distinct request runs once per module on each side (the machine is small); params are hashable.
@pytest.fixture(scope="module")
def ref(pipe):
    return functools.cache(lambda p: i2v_a14b_frames(pipe, p))


@pytest.fixture(scope="module")
def ours(runner):
    return functools.cache(lambda p: runner.decode_float(p))


def test_oracle_uses_both_experts_with_the_boundary_mid_schedule(pipe):
    # 4 UniPC steps at flow shift 3 give the int timesteps 999, 900, 750, 500 (sigma 0.9001 -> t 900).
    # The I2V boundary is 0.9 * 1000 = 900 and diffusers compares `t >= 900`, so steps 0-1
    # (t 999, 900) run `transformer` (high noise, guidance_scale) and steps 2-3 (t 750, 500) run
    # `transformer_2` (low noise, guidance_scale_2). Step 1 sits exactly on the boundary, so the
    # engine must compare the same integer timestep with >=. With CFG each step is two forwards
    # (cond, uncond), each on 36 channels (16 noise + 4 mask + 16 image latents).
    with record_transformer_calls(pipe) as calls:
        i2v_a14b_frames(pipe, params())
    assert [(name, int(t.item())) for name, t, _ in calls] == [
        ("transformer", 999),
        ("transformer", 999),
        ("transformer", 900),
        ("transformer", 900),
        ("transformer_2", 750),
        ("transformer_2", 750),
        ("transformer_2", 500),
        ("transformer_2", 500),
    ]
    assert {channels for *_, channels in calls} == {36}


def test_oracle_depends_on_the_image(ref):
    # The A14B image only enters as 16 of the 36 input channels, so on random weights its effect is
    # small (about 0.03 max abs here), but far above both the 1e-3 below and the 2e-5 tolerance.
    assert not torch.allclose(ref(params()), ref(params(image=OTHER_IMAGE)), atol=1e-3)


def test_i2v_with_cfg_and_both_experts_matches_diffusers(ours, ref):
    p = params()
    assert ours(p).shape == ref(p).shape == (FRAMES, HEIGHT, WIDTH, 3)
    torch.testing.assert_close(ours(p), ref(p), atol=ATOL, rtol=0)


def test_i2v_without_cfg_matches_diffusers(ours, ref):
    # guidance_scale 1.0 turns CFG off for the whole run (diffusers decides from the high-noise scale).
    p = params(guidance_scale=1.0, guidance_scale_2=1.0, seed=7)
    torch.testing.assert_close(ours(p), ref(p), atol=ATOL, rtol=0)


def test_i2v_with_another_image_matches_diffusers(ours, ref):
    p = params(image=OTHER_IMAGE)
    torch.testing.assert_close(ours(p), ref(p), atol=ATOL, rtol=0)


def test_the_image_changes_the_video(ours):
    assert not torch.allclose(ours(params()), ours(params(image=OTHER_IMAGE)), atol=1e-3)
