"""A worker group of 2 ranks (Ulysses 2, gloo) against the same requests in one process, with the
VAE decoded in tiles spread over the ranks (tile k of each chunk on rank k mod 2, gathered).

Tolerances: one request alone gives the single-process frames bit for bit (Ulysses slices the
sequence and all-to-alls whole heads: every attention row sees the same keys in the same order;
measured max |diff| 0.0 on float frames), also at a length that does not divide by 2. A request
batched with another at a different step may differ by one 8-bit level from its run alone, as in
one process (tests/engine/test_batching_equivalence.py: batched BLAS blocking, ~1e-6 on floats).
"""

import numpy as np
import pytest

from models.wan.spec import read_spec
from serve.config import ServerConfig
from serve.engine.client import EngineClient
from serve.pipeline.mp4 import decode_mp4
from serve.vae.config import VaeDecodeConfig
from serve.worker.model_runner import ModelRunner
from tests.parallel.conftest import TIMEOUT_S, check_batch_at_different_steps, request

# 64x64 pixels = 8x8 latent: tiles of 4 latent pixels every 3 give a 3x3 grid, blended over 8 pixels.
TILED = {"tile_sample_size": 32, "tile_sample_overlap": 8}


@pytest.fixture(scope="module")
def core(tiny_model_dir):
    """Built as `reelserve serve --workers 2 --parallel ulysses=2` builds it (the group calibrates
    the cost model at start, in lockstep); MP4s go to a fresh temporary directory."""
    config = ServerConfig(
        model_dir=tiny_model_dir,
        workers={"count": 2, "parallel": "ulysses=2"},
        scheduler={"max_batch_size": 4, "expert_policy": "fcfs"},
        vae=TILED,
    )
    client = EngineClient(config)
    assert [w.group.devices for w in client.core.executor.workers] == [("cpu", "cpu")]  # one logical worker
    client.start()
    yield client.core
    client.stop()


@pytest.fixture(scope="module")
def alone(tiny_model_dir):
    """uint8 frames of a request run alone in this process (one rank, no group)."""
    runner = ModelRunner.from_checkpoint(tiny_model_dir, vae_decode=VaeDecodeConfig(**TILED))
    return lambda params: runner.generate(params).frames


def frames(future) -> np.ndarray:
    return decode_mp4(future.result(TIMEOUT_S).mp4)[0]


def test_one_request_is_bit_identical_to_one_process(core, alone):
    p = request(seed=3)
    np.testing.assert_array_equal(frames(core.add_request(p)[1]), alone(p))


def test_a_sequence_that_does_not_divide_is_bit_identical(core, alone, tiny_model_dir):
    p = request(seed=4, height=48, width=48)  # 3 latent frames x 3 x 3 patches: 27 tokens, odd
    assert read_spec(tiny_model_dir).tokens(p.height, p.width, p.num_frames) % 2 == 1
    np.testing.assert_array_equal(frames(core.add_request(p)[1]), alone(p))


def test_a_batch_at_different_steps_matches_each_alone(core, alone):
    check_batch_at_different_steps(core, alone, levels=1)
