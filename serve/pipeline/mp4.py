"""MP4 encode (PyAV): H.264 yuv420p for players, or lossless RGB H.264 for evaluation pipelines."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterable, Sequence
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

    def abort(self) -> None:
        """Close the file without finishing the video (after a failed write: a deleted file that
        stays open keeps its disk space until the process lets go of it)."""
        with contextlib.suppress(Exception):  # the error that got us here is the one to report
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


def stream_chunks_to_mp4s(
    chunks: Iterable[np.ndarray],
    sinks: Sequence,
    fps: Sequence[int],
    lossless: Sequence[bool],
    shapes: Sequence[tuple[int, int, int]] | None = None,
) -> dict[str, float]:
    """Encode a batch of videos that arrive as uint8 chunks (B, f, H, W, 3) into one MP4 per video
    (`sinks[i]`: a path or a binary file object), each chunk as soon as it arrives.

    No video ever exists whole; each encoder holds only its lookahead. `shapes[i]`, when given, is
    the (frames, height, width) the video must have: a runner bug fails its request here instead of
    reaching the client as a wrong-sized video. Returns seconds: `decode` (waiting for chunks),
    `mp4` (inside the encoders), `first_chunk` (until the first frames arrived) and `total`."""
    timings = {"decode": 0.0, "mp4": 0.0}
    writers: list[Mp4Writer] = []
    try:
        _encode_chunks(chunks, sinks, fps, lossless, shapes, writers, timings)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    return timings


def _encode_chunks(chunks, sinks, fps, lossless, shapes, writers: list[Mp4Writer], timings: dict) -> None:
    start = mark = time.perf_counter()
    written = 0
    for frames in chunks:
        now = time.perf_counter()
        timings["decode"] += now - mark
        _check_chunk(frames, len(sinks), shapes, written)
        if not writers:
            timings["first_chunk"] = now - start
            height, width = frames.shape[2:4]
            writers += [Mp4Writer(sink, width, height, r, lo) for sink, r, lo in zip(sinks, fps, lossless, strict=True)]
        for writer, video in zip(writers, frames, strict=True):
            writer.write(video)
        written += frames.shape[1]
        mark = time.perf_counter()
        timings["mp4"] += mark - now
    if shapes is not None and any(written != frames for frames, _, _ in shapes):
        expected = [(frames, height, width, 3) for frames, height, width in shapes]
        raise RuntimeError(f"runner returned {written} frames, expected uint8 {expected}")
    for writer in writers:
        writer.close()
    timings["mp4"] += time.perf_counter() - mark
    timings["total"] = time.perf_counter() - start


def _check_chunk(frames: np.ndarray, batch: int, shapes, written: int) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 5 or frames.shape[0] != batch or frames.shape[-1] != 3:
        expected = f"uint8 ({batch}, f, H, W, 3)"
        raise RuntimeError(f"runner returned a {frames.dtype} chunk {frames.shape}, expected {expected}")
    for frames_total, height, width in shapes or ():
        if frames.shape[2:4] != (height, width) or written + frames.shape[1] > frames_total:
            got = f"{frames.dtype} frames {tuple(frames.shape[1:])} after {written}"
            raise RuntimeError(f"runner returned {got}, expected uint8 {(frames_total, height, width, 3)}")
