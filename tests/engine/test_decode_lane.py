"""The worker's decode lane (`--vae-overlap on`) against real spawned workers: a decode runs while the
same worker steps other requests, a decode that fails or kills the worker loses nothing else, and
the real model's videos are the same bytes with the lane on or off."""

import re

import numpy as np
import pytest

from serve.engine.core import GenerationFailed
from serve.pipeline.mp4 import decode_mp4
from serve.vae.config import VaeDecodeConfig
from serve.worker.factory import DEFAULT_RUNNER_FACTORY, RunnerConfig
from tests.engine.conftest import make_core
from tests.engine.fake_runner import fake_frames
from tests.engine.test_core import params

TIMEOUT_S = 180  # guards hangs only
LANE = RunnerConfig(vae=VaeDecodeConfig(overlap="on"))
NO_LANE = RunnerConfig(vae=VaeDecodeConfig(overlap="off"))


def overlapped_units(core) -> float:
    text = core.render_metrics().decode()
    return float(re.search(r"^reelserve:decode_overlapped_units_total\{[^}]*\} (\S+)$", text, re.M).group(1))


@pytest.fixture
def lane_core(tmp_path):
    core = make_core(str(tmp_path), options=LANE)
    core.start()
    yield core
    core.stop()


def test_a_decode_on_the_lane_runs_while_its_worker_steps_another_request(tmp_path):
    """`first` cannot finish decoding until another request takes a step meanwhile: with the lane it
    does (`later` steps while it decodes); without it (the control) it fails, as the worker is busy."""
    results = {}
    for options, wait_s in ((LANE, 120), (NO_LANE, 2)):
        core = make_core(str(tmp_path), options=options)
        core.start()
        try:
            _, first = core.add_request(p_first := params(f"decode-waits-for-step:{wait_s}", seed=1))
            _, later = core.add_request(p_later := params("sleep:2", seed=2, num_inference_steps=24))
            later_result = later.result(TIMEOUT_S)
            try:
                results[options.vae.overlap] = first.result(TIMEOUT_S), overlapped_units(core)
            except GenerationFailed as e:
                results[options.vae.overlap] = e, overlapped_units(core)
        finally:
            core.stop()
        np.testing.assert_array_equal(decode_mp4(later_result.mp4)[0], fake_frames(p_later))
    (with_lane, overlapped), (without, none) = results["on"], results["off"]
    np.testing.assert_array_equal(decode_mp4(with_lane.mp4)[0], fake_frames(p_first))
    assert overlapped >= 1 and ("decode", 0, 1) in with_lane.trace
    assert isinstance(without, GenerationFailed) and "no denoising step ran while this request decoded" in str(without)
    assert none == 0


def test_a_decode_that_fails_on_the_lane_fails_alone_and_the_worker_serves_on(lane_core):
    _, bad = lane_core.add_request(params("bad-shape", seed=1))
    _, good = lane_core.add_request(p_good := params("sleep:1", seed=2, num_inference_steps=12))
    with pytest.raises(GenerationFailed):
        bad.result(TIMEOUT_S)
    np.testing.assert_array_equal(decode_mp4(good.result(TIMEOUT_S).mp4)[0], fake_frames(p_good))
    _, again = lane_core.add_request(p_again := params(seed=3))
    np.testing.assert_array_equal(decode_mp4(again.result(TIMEOUT_S).mp4)[0], fake_frames(p_again))
    assert lane_core.executor.workers[0].restarts == 0


def test_a_worker_that_dies_decoding_on_the_lane_loses_no_request(lane_core, tmp_path):
    """`dies` kills its worker while on the lane, mid-way through `mid`'s steps: both start over from
    their seeds on the restarted worker (`dies` decodes the second time) and give their videos."""
    _, dies = lane_core.add_request(p_dies := params(f"decode-exit-once:{tmp_path / 'died'}", seed=1))
    _, mid = lane_core.add_request(p_mid := params("sleep:2", seed=2, num_inference_steps=24))
    mid_result, dies_result = mid.result(TIMEOUT_S), dies.result(TIMEOUT_S)
    np.testing.assert_array_equal(decode_mp4(mid_result.mp4)[0], fake_frames(p_mid))
    np.testing.assert_array_equal(decode_mp4(dies_result.mp4)[0], fake_frames(p_dies))
    assert (tmp_path / "died").exists() and lane_core.executor.workers[0].restarts == 1
    assert [kind for kind, _, _ in mid_result.trace].count("encode") == 2  # started over


def test_the_real_models_videos_are_the_same_bytes_with_the_lane_on_or_off(tiny_model_dir):
    """Two requests of different lengths, so the short one decodes on the lane (its own thread, on a CPU
    with the worker's thread count) while the long one steps. How much the two overlap depends on the
    machine's timing, so it is not asserted here (the fake runner's test above forces the overlap)."""
    requests = [
        params("a red square moving left", seed=5, num_inference_steps=2, height=48, width=64, num_frames=9),
        params("a blue disc", seed=6, num_inference_steps=6, height=48, width=64, num_frames=9),
    ]
    videos = {}
    for options in (LANE, NO_LANE):
        core = make_core(str(tiny_model_dir), DEFAULT_RUNNER_FACTORY, options=options)
        core.start()
        try:
            futures = [core.add_request(p)[1] for p in requests]
            videos[options.vae.overlap] = [f.result(TIMEOUT_S).mp4 for f in futures]
        finally:
            core.stop()
    assert videos["on"] == videos["off"]


@pytest.mark.parametrize(
    ("overlap", "device", "fits", "on"),
    [
        ("auto", "cuda:0", True, True),
        ("auto", "cuda:0", False, False),  # no room for a decode beside a step with every weight there
        ("auto", "cpu", True, False),  # both lanes would compete for the same cores
        ("on", "cpu", False, True),
        ("off", "cuda:1", True, False),
    ],
)
def test_auto_turns_the_lane_on_for_a_cuda_device_with_room_for_it(overlap, device, fits, on):
    assert VaeDecodeConfig(overlap=overlap).overlaps_on(device, fits) is on
