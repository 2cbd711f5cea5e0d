import numpy as np
import pytest

from serve.pipeline.mp4 import decode_mp4, encode_mp4


@pytest.fixture
def frames():
    return np.random.default_rng(0).integers(0, 256, (9, 48, 64, 3), dtype=np.uint8)


def test_lossless_round_trip_is_exact(frames):
    decoded, fps = decode_mp4(encode_mp4(frames, fps=16, lossless=True))
    assert fps == 16
    np.testing.assert_array_equal(decoded, frames)


@pytest.mark.parametrize("fps", [8, 16, 24])
def test_playable_mp4_keeps_count_size_and_fps(frames, fps):
    decoded, got_fps = decode_mp4(encode_mp4(frames, fps=fps))
    assert decoded.shape == frames.shape
    assert got_fps == fps


def test_smooth_frames_survive_lossy_encoding_closely():
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    frames = np.broadcast_to(ramp[None, None, :, None], (5, 32, 64, 3)).astype(np.uint8).copy()
    decoded, _ = decode_mp4(encode_mp4(frames, fps=16))
    assert np.abs(decoded.astype(int) - frames).mean() < 3


def test_bad_frames_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(np.zeros((2, 8, 8, 3), dtype=np.float32), fps=16)
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((2, 9, 8, 3), dtype=np.uint8), fps=16)
