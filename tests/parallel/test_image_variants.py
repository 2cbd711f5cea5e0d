"""Image-to-video in worker groups: Wan2.2 I2V-A14B (36 input channels, two experts) on Ulysses 2,
and TI2V-5B (per-token timesteps, which diffusers' plan splits with the sequence) on CFG 2 x
Ulysses 2, against the same request in one process.

Tolerances as in test_ulysses.py / test_cfg_ulysses.py: bit for bit on Ulysses alone, one 8-bit
level once CFG rows are split (a batch of one instead of two in the matmuls, ~1e-6 on floats).
The I2V run decodes its VAE tiles across the two ranks (rank 0 logs it), bit for bit too."""

import dataclasses

import numpy as np
import pytest

from models.tiny import write_tiny_checkpoint
from serve.pipeline.mp4 import decode_mp4
from serve.vae.config import VaeDecodeConfig
from serve.worker.factory import RunnerConfig
from serve.worker.model_runner import ModelRunner
from tests.models.wan.reference import make_condition_image
from tests.parallel.conftest import TIMEOUT_S, group_core, request

# 64x64 pixels = 8x8 latent (Wan2.1 VAE): tiles of 4 latent pixels every 3, a 3x3 grid.
TILED = VaeDecodeConfig(tile_sample_size=32, tile_sample_overlap=8)


@pytest.mark.parametrize(
    ("layout", "degrees", "vae", "levels"),
    [("i2v-a14b", (2, 1), TILED, 0), ("ti2v-5b", (2, 2), VaeDecodeConfig(), 1)],
)
def test_image_request_in_a_group_matches_one_process(tmp_path, capfd, layout, degrees, vae, levels):
    model_dir = str(write_tiny_checkpoint(tmp_path / layout, layout=layout))
    p = dataclasses.replace(request(seed=8), image=make_condition_image(64, 64, square_rgb=(40, 200, 60)))
    alone = ModelRunner.from_checkpoint(model_dir, vae_decode=vae).generate(p).frames.astype(int)
    core = group_core(model_dir, [degrees], str(tmp_path / "outputs"), RunnerConfig(vae=vae))
    core.start()
    try:
        got = decode_mp4(core.add_request(p)[1].result(TIMEOUT_S).mp4)[0].astype(int)
    finally:
        core.stop()
    assert np.abs(got - alone).max() <= levels
    spread = "decoded 1 video(s) with their VAE tiles spread over 2 ranks" in capfd.readouterr().err
    assert spread == (vae.tile_sample_size is not None)
