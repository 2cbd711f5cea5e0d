"""Streaming decode into the MP4 writer, and the background-decode helper."""

import io
import threading

import numpy as np
import torch

from models.wan.vae_decode import wan_decode_stage
from serve.pipeline.decode import stream_decode_to_mp4, to_uint8
from serve.pipeline.mp4 import decode_mp4, encode_mp4
from serve.vae import VaeDecodeConfig
from serve.vae.overlap import SideLane
from tests.vae.conftest import latents

TILED = VaeDecodeConfig(tile_sample_size=32, tile_sample_overlap=8, chunk_latent_frames=2)


class RecordingSink(io.BytesIO):
    """A file object that remembers how many bytes it held whenever asked."""

    def size(self) -> int:
        return len(self.getbuffer())


def test_streamed_mp4_matches_the_non_streaming_path(tiny_vae):
    z = latents((1, 16, 9, 6, 8))  # 33 frames of 48x64
    stage = wan_decode_stage(tiny_vae, TILED)
    expected = to_uint8(stage(z))
    sink = io.BytesIO()
    timings = stream_decode_to_mp4(stage, z, sink, fps=16, lossless=True)
    frames, fps = decode_mp4(sink.getvalue())
    assert frames.shape == (33, 48, 64, 3) and fps == 16
    np.testing.assert_array_equal(frames, expected)
    np.testing.assert_array_equal(frames, decode_mp4(encode_mp4(expected, fps=16, lossless=True))[0])
    assert set(timings) == {"decode", "mp4", "first_chunk", "total"}


def test_first_mp4_bytes_exist_before_decoding_ends(tiny_vae):
    z = latents((1, 16, 9, 6, 8))
    stage = wan_decode_stage(tiny_vae, VaeDecodeConfig(chunk_latent_frames=1))
    sink = RecordingSink()
    sizes_before_chunk = []
    iter_chunks = stage.decoder.iter_chunks

    def recording(z, **kwargs):
        for chunk in iter_chunks(z, **kwargs):
            yield chunk
            sizes_before_chunk.append(sink.size())  # resumed: the next chunk's decode starts now

    stage.decoder.iter_chunks = recording
    stream_decode_to_mp4(stage, z, sink, fps=16, lossless=True)
    print(f"bytes in the sink as each chunk's decode started: {sizes_before_chunk}, final {sink.size()}")
    # Encoded frame data (well past the few-dozen-byte header) was out before the last chunk decoded.
    assert sizes_before_chunk[-2] > 1000
    assert sizes_before_chunk[-2] < sink.size()


def test_stream_decode_of_full_frames_equals_decode_stage_call(tiny_vae):
    z = latents((1, 16, 3, 6, 8))
    stage = wan_decode_stage(tiny_vae)
    chunks = list(stage.iter_frames(z))
    assert [c.shape for c in chunks] == [(1, 1, 48, 64, 3), (1, 4, 48, 64, 3), (1, 4, 48, 64, 3)]
    assert torch.equal(torch.cat(chunks, dim=1)[0], stage(z))


def test_a_decode_handed_to_the_lane_runs_off_the_caller_thread_and_gives_the_same_mp4(tiny_vae):
    z = latents((1, 16, 3, 6, 8))
    stage = wan_decode_stage(tiny_vae, TILED)
    threads, sink = [], io.BytesIO()
    handoff = SideLane("cpu").handoff()  # on the caller's thread, as the worker hands a decode over

    def job():
        with handoff:
            threads.append(threading.current_thread())
            stream_decode_to_mp4(stage, z, sink, fps=8, lossless=True)

    lane = threading.Thread(target=job)
    lane.start()
    torch.randn(256, 256) @ torch.randn(256, 256)  # the caller keeps working meanwhile
    lane.join(60)
    assert threads == [lane]
    direct = io.BytesIO()
    stream_decode_to_mp4(stage, z, direct, fps=8, lossless=True)
    np.testing.assert_array_equal(decode_mp4(sink.getvalue())[0], decode_mp4(direct.getvalue())[0])
