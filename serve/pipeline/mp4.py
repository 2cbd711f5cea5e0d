"""MP4 encode (PyAV): H.264 yuv420p for players, or lossless RGB H.264 for evaluation pipelines."""

from __future__ import annotations

import io
from collections.abc import Iterable
from fractions import Fraction

import av
import numpy as np

# libx264rgb at qp 0 keeps RGB exactly (no chroma subsampling, no colour-space conversion),
# so a lossless MP4 decodes back to the engine's uint8 frames bit for bit.
LOSSLESS = ("libx264rgb", "rgb24", {"qp": "0", "preset": "veryfast"})
PLAYABLE = ("libx264", "yuv420p", {"crf": "18", "preset": "veryfast"})


class Mp4Writer:
    """Encodes frames as they arrive, so a caller can feed decoded chunks without holding the video."""

    def __init__(self, sink, width: int, height: int, fps: int, lossless: bool = False) -> None:
        codec, pix_fmt, options = LOSSLESS if lossless else PLAYABLE
        if not lossless and (width % 2 or height % 2):
            raise ValueError(f"yuv420p needs even width and height, got {width}x{height}")
        self._container = av.open(sink, mode="w", format="mp4")
        self._stream = self._container.add_stream(codec, rate=Fraction(fps))
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = pix_fmt
        self._stream.options = options
        self._stream.codec_context.time_base = Fraction(1, fps)
        self._next_pts = 0

    def write(self, frames: Iterable[np.ndarray]) -> None:
        """Write uint8 RGB frames of shape (H, W, 3)."""
        for array in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts = self._next_pts
            self._next_pts += 1
            self._container.mux(self._stream.encode(frame))

    def close(self) -> None:
        self._container.mux(self._stream.encode(None))
        self._container.close()


def encode_mp4(frames: np.ndarray, fps: int, lossless: bool = False) -> bytes:
    """Encode uint8 frames (F, H, W, 3) into MP4 bytes."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames of shape (F, H, W, 3), got {frames.dtype} {frames.shape}")
    buffer = io.BytesIO()
    writer = Mp4Writer(buffer, width=frames.shape[2], height=frames.shape[1], fps=fps, lossless=lossless)
    writer.write(frames)
    writer.close()
    return buffer.getvalue()


def decode_mp4(data: bytes) -> tuple[np.ndarray, float]:
    """Decode MP4 bytes to uint8 RGB frames (F, H, W, 3) and the stream's frame rate."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        fps = float(stream.average_rate or stream.base_rate)
    return np.stack(frames), fps
