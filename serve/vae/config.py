"""How a Wan latent is cut for decoding: temporal chunks, spatial tiles, and how many workers share them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DecodeOrder = Literal["chunk-major", "tile-major"]
DECODE_ORDERS: tuple[DecodeOrder, ...] = ("chunk-major", "tile-major")


@dataclass(frozen=True)
class VaeDecodeConfig:
    """Decode geometry. The default (no tiles, one latent frame per chunk, one worker) is diffusers'
    untiled decode, done chunk by chunk so frames can stream out."""

    tile_sample_size: int | None = None
    """Tile edge in output pixels (a multiple of the VAE's spatial compression, 8 for Wan2.1).
    None decodes whole frames; a frame no larger than one tile is never split."""

    tile_sample_overlap: int = 64
    """Pixels shared by neighbouring tiles and linearly blended; tile stride = size - overlap.
    diffusers defaults to 256/192 (overlap 64); less overlap shows seams, more costs compute."""

    chunk_latent_frames: int = 1
    """Latent frames per decoder call after the first (which is always one: Wan's causal first
    latent frame decodes to one video frame, the others to four). Each latent frame is 4 video frames."""

    workers: int = 1
    """Tiles of a chunk decoded concurrently: threads on CPU, or one per device when given several."""

    threads_per_worker: int | None = None
    """Intra-op torch threads of each CPU worker thread; None splits the process's threads evenly. oneDNN
    partitions a conv's sums by thread count, so outputs are bit-identical across worker counts only at
    a fixed value (measured: 1 vs 2 threads differ by about 2e-6). Left None with one worker, decode runs in
    the caller's thread with its thread count."""

    order: DecodeOrder = "chunk-major"
    """"chunk-major" (default): all tiles advance one temporal chunk together and each chunk is yielded as
    soon as it is blended, so frames stream out; but every tile's causal cache is alive at once.
    "tile-major": one tile is decoded over all chunks (only its cache alive), then the next, blended into
    one whole-video buffer; nothing can be yielded before the last tile, so streaming is lost. Same frames
    bit for bit. Peak memory rise vs diffusers' untiled decode (bench/vae_decode.py: 256x256, 33 frames,
    128/32 tiles, uint8 output): chunk-major 0.75x (chunk 1) / 0.86x (chunk 2); tile-major 0.30x / 0.39x, at
    about the same time. With `workers` > 1 that many tiles are alive at once (0.46x for 2). Use it when
    memory, not time to first frame, is the limit."""

    def __post_init__(self) -> None:
        if self.tile_sample_size is not None and self.tile_sample_size <= 0:
            raise ValueError(f"tile_sample_size must be positive or None, got {self.tile_sample_size}")
        if self.tile_sample_size is not None and not 0 <= self.tile_sample_overlap < self.tile_sample_size:
            raise ValueError(
                f"tile_sample_overlap must be in [0, tile_sample_size={self.tile_sample_size}), "
                f"got {self.tile_sample_overlap}; lower the overlap or raise the tile size"
            )
        if self.chunk_latent_frames < 1:
            raise ValueError(f"chunk_latent_frames must be >= 1, got {self.chunk_latent_frames}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise ValueError(f"threads_per_worker must be >= 1 or None, got {self.threads_per_worker}")
        if self.order not in DECODE_ORDERS:
            raise ValueError(f"order must be one of {DECODE_ORDERS}, got {self.order!r}")

    @property
    def tiled(self) -> bool:
        return self.tile_sample_size is not None


def chunk_bounds(num_latent_frames: int, chunk_latent_frames: int) -> list[tuple[int, int]]:
    """[start, end) latent frame ranges: the first is one frame (Wan's cache starts in "Rep" mode, so a
    longer first call would skip the temporal upsample of its later frames), then `chunk_latent_frames` each."""
    bounds = [(0, min(1, num_latent_frames))]
    for start in range(1, num_latent_frames, chunk_latent_frames):
        bounds.append((start, min(start + chunk_latent_frames, num_latent_frames)))
    return bounds
