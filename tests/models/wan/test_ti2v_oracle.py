"""reelserve's Wan2.2 TI2V-5B path against diffusers (tests/models/wan/reference.py).

Text-only requests are checked against `WanPipeline` with expand_timesteps; requests with an image
against `WanImageToVideoPipeline` loaded from the same "ti2v-5b" checkpoint (its expand_timesteps
branch: latent frame 0 is the image's latents, with timestep 0 on its tokens). fp32 on CPU, the T2V
oracle's tolerance (ATOL 2e-5, see tests/pipeline/test_oracle.py). Height and width are multiples of
32 (16x VAE times the 2x2 patch) and not equal, so a height/width mix-up cannot pass.
"""

import functools
from functools import partial

import pytest
import torch

from models.tiny import write_tiny_checkpoint
from serve.worker.model_runner import ModelRunner
from tests.models.wan.reference import (
    ATOL,
    make_condition_image,
    record_transformer_calls,
    ti2v_image_frames,
    ti2v_image_pipeline,
    ti2v_text_frames,
    ti2v_text_pipeline,
)
from tests.requests import make_params

HEIGHT, WIDTH, FRAMES = 64, 96, 9
LATENT_FRAMES, TOKENS_PER_FRAME = 3, (HEIGHT // 32) * (WIDTH // 32)  # 16x VAE, 2x2 patch

IMAGE = make_condition_image(WIDTH, HEIGHT)
OTHER_IMAGE = make_condition_image(WIDTH, HEIGHT, square_rgb=(20, 200, 60), square_at=(0.5, 0.4))

params = partial(
    make_params,
    prompt="a red square moving left",
    negative_prompt="blurry, static",
    height=HEIGHT,
    width=WIDTH,
    num_frames=FRAMES,
    fps=24,
    num_inference_steps=4,
    guidance_scale=5.0,
    guidance_scale_2=5.0,
    seed=4321,
)


@pytest.fixture(scope="module")
def ti2v_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ti2v") / "ti2v-5b", layout="ti2v-5b")


@pytest.fixture(scope="module")
def text_pipe(ti2v_dir):
    return ti2v_text_pipeline(ti2v_dir)


@pytest.fixture(scope="module")
def image_pipe(ti2v_dir):
    return ti2v_image_pipeline(ti2v_dir)


@pytest.fixture(scope="module")
def runner(ti2v_dir):
    return ModelRunner.from_checkpoint(ti2v_dir)


# Each distinct request runs once per module on each side (the machine is small); params are hashable.
# Text-only requests go to WanPipeline, requests with an image to WanImageToVideoPipeline.
@pytest.fixture(scope="module")
def ref(text_pipe, image_pipe):
    return functools.cache(
        lambda p: ti2v_text_frames(text_pipe, p) if p.image is None else ti2v_image_frames(image_pipe, p)
    )


@pytest.fixture(scope="module")
def ours(runner):
    return functools.cache(lambda p: runner.decode_float(p))


def test_text_oracle_gives_every_token_the_step_timestep(text_pipe):
    # 4 UniPC steps at the TI2V flow shift 5: t = 999, 937, 833, 625; CFG: cond + uncond per step.
    with record_transformer_calls(text_pipe) as calls:
        ti2v_text_frames(text_pipe, params())
    assert [name for name, *_ in calls] == ["transformer"] * 8
    for (_, t, channels), step_t in zip(calls, [999, 999, 937, 937, 833, 833, 625, 625], strict=True):
        assert channels == 48 and t.shape == (1, LATENT_FRAMES * TOKENS_PER_FRAME)
        assert t.eq(step_t).all()


def test_image_oracle_runs_the_expand_timesteps_branch(image_pipe):
    # The first latent frame's tokens get timestep 0 (they are the clean image latents), the rest t.
    with record_transformer_calls(image_pipe) as calls:
        ti2v_image_frames(image_pipe, params(image=IMAGE))
    assert len(calls) == 8
    for (name, t, channels), step_t in zip(calls, [999, 999, 937, 937, 833, 833, 625, 625], strict=True):
        assert name == "transformer" and channels == 48
        assert t.shape == (1, LATENT_FRAMES * TOKENS_PER_FRAME)
        assert t[0, :TOKENS_PER_FRAME].eq(0).all() and t[0, TOKENS_PER_FRAME:].eq(step_t).all()


def test_image_oracle_depends_on_the_image(ref):
    a, b, text = ref(params(image=IMAGE)), ref(params(image=OTHER_IMAGE)), ref(params())
    assert not torch.allclose(a, b, atol=1e-3) and not torch.allclose(a, text, atol=1e-3)


def test_ti2v_text_only_with_cfg_matches_diffusers(ours, ref):
    p = params()
    assert ours(p).shape == ref(p).shape == (FRAMES, HEIGHT, WIDTH, 3)
    torch.testing.assert_close(ours(p), ref(p), atol=ATOL, rtol=0)


def test_ti2v_with_image_and_cfg_matches_diffusers(ours, ref):
    p = params(image=IMAGE)
    assert ours(p).shape == ref(p).shape == (FRAMES, HEIGHT, WIDTH, 3)
    torch.testing.assert_close(ours(p), ref(p), atol=ATOL, rtol=0)


def test_ti2v_with_another_image_without_cfg_matches_diffusers(ours, ref):
    p = params(image=OTHER_IMAGE, guidance_scale=1.0, guidance_scale_2=1.0, seed=9)
    torch.testing.assert_close(ours(p), ref(p), atol=ATOL, rtol=0)


def test_the_image_changes_the_video(ours):
    a, b, text = ours(params(image=IMAGE)), ours(params(image=OTHER_IMAGE)), ours(params())
    assert not torch.allclose(a, b, atol=1e-3) and not torch.allclose(a, text, atol=1e-3)
