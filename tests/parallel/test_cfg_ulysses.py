"""A worker group of 4 ranks (CFG 2 x Ulysses 2, gloo) against the same requests in one process.

Tolerance: one 8-bit level. Each CFG half runs its rows as a batch of one instead of two, so BLAS
blocks the matmuls differently (measured max |diff| 1.7e-6 on float frames in [0, 1], which can
cross a rounding boundary); the Ulysses split itself is exact (tests/parallel/test_ulysses.py).
"""

import numpy as np
import pytest

from serve.pipeline.mp4 import decode_mp4
from serve.worker.model_runner import ModelRunner
from tests.parallel.conftest import TIMEOUT_S, check_batch_at_different_steps, group_core, request

LEVELS = 1


@pytest.fixture(scope="module")
def core(tiny_model_dir, outputs_dir):
    engine = group_core(str(tiny_model_dir), [(2, 2)], outputs_dir, max_batch_size=4, expert_policy="fcfs")
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def alone(tiny_model_dir):
    runner = ModelRunner.from_checkpoint(tiny_model_dir)
    return lambda params: runner.generate(params).frames.astype(int)


def decoded(result) -> np.ndarray:
    return decode_mp4(result.mp4)[0].astype(int)


def test_one_request_and_an_odd_length_match_one_process(core, alone):
    for p in (request(seed=3), request(seed=4, height=48, width=48)):  # 27 tokens: uneven Ulysses slices
        got = decoded(core.add_request(p)[1].result(TIMEOUT_S))
        assert np.abs(got - alone(p)).max() <= LEVELS


def test_a_batch_at_different_steps_matches_each_alone(core, alone):
    check_batch_at_different_steps(core, alone, LEVELS)  # 4 rows (2 cond, 2 uncond) split 2 + 2
