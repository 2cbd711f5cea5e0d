"""VAE decode tiles spread over a group's ranks (tile k of each chunk on rank k mod 2), gathered on
rank 0 and written to the MP4: the same bytes as the same tiled decode in one process (each tile
runs the same ops on the same input; the gather copies)."""

import numpy as np

from serve.pipeline.mp4 import decode_mp4
from serve.vae.config import VaeDecodeConfig
from serve.worker.factory import RunnerConfig
from serve.worker.model_runner import ModelRunner
from tests.parallel.conftest import TIMEOUT_S, group_core, request

# 64x64 pixels = 8x8 latent: tiles of 4 latent pixels every 3 give a 3x3 grid, blended over 8 pixels.
TILED = VaeDecodeConfig(tile_sample_size=32, tile_sample_overlap=8)


def test_tiles_decoded_across_two_ranks_equal_one_process(tiny_model_dir, capfd):
    p = request(seed=9)
    alone = ModelRunner.from_checkpoint(tiny_model_dir, vae_decode=TILED).generate(p).frames
    core = group_core(str(tiny_model_dir), [(2, 1)], RunnerConfig(vae=TILED))
    core.start()
    try:
        got = decode_mp4(core.add_request(p)[1].result(TIMEOUT_S).mp4)[0]
    finally:
        core.stop()
    assert "VAE decode: tile k of every chunk on rank k mod 2" in capfd.readouterr().err
    np.testing.assert_array_equal(got, alone)
