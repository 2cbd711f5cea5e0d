"""How a Wan latent is cut for decoding: temporal chunks, spatial tiles, and how many workers share them.

`VaeDecodeConfig` is the VAE's part of the server's config tree (`ServerConfig.vae`, flags `--vae-*`)
and goes to the worker as is. Torch-free.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from serve.frozen import FrozenConfig, flag

DecodeOrder = Literal["chunk-major", "tile-major"]
DECODE_ORDERS: tuple[DecodeOrder, ...] = ("chunk-major", "tile-major")
Overlap = Literal["auto", "on", "off"]
OVERLAPS: tuple[Overlap, ...] = ("auto", "on", "off")


class VaeDecodeConfig(FrozenConfig):
    """Decode geometry. The default (no tiles, one latent frame per chunk, one worker) is diffusers'
    untiled decode, done chunk by chunk so frames can stream out."""

    tile_sample_size: int | None = Field(None, ge=16, json_schema_extra=flag("--vae-tile"))
    """Tile edge in output pixels (a multiple of the VAE's spatial compression, 8 for Wan2.1).
    None decodes whole frames; a frame no larger than one tile is never split."""

    tile_sample_overlap: int = Field(64, ge=0, json_schema_extra=flag("--vae-tile-overlap"))
    """Pixels shared by neighbouring tiles and linearly blended; tile stride = size - overlap.
    diffusers defaults to 256/192 (overlap 64); less overlap shows seams, more costs compute."""

    chunk_latent_frames: int = Field(1, ge=1, json_schema_extra=flag("--vae-chunk-frames"))
    """Latent frames per decoder call after the first (which is always one: Wan's causal first
    latent frame decodes to one video frame, the others to four). Each latent frame is 4 video frames."""

    workers: int = Field(1, ge=1, json_schema_extra=flag("--vae-workers"))
    """Tiles of a chunk decoded concurrently: threads on CPU, or one per device when given several."""

    threads_per_worker: int | None = Field(None, ge=1, json_schema_extra=flag("--vae-threads-per-worker"))
    """Intra-op torch threads of each CPU worker thread; None splits the process's threads evenly between
    untiled workers and gives each tile worker one (small ops lose more at OpenMP barriers than threads
    gain: see `serve.vae.parallel.threads_per_worker`). oneDNN
    partitions a conv's sums by thread count, so outputs are bit-identical across worker counts only at
    a fixed value (measured: 1 vs 2 threads differ by about 2e-6). Left None with one worker and no tiles,
    decode runs in the caller's thread with its thread count."""

    order: DecodeOrder = Field("chunk-major", json_schema_extra=flag("--vae-order"))
    """"chunk-major" (default): all tiles advance one temporal chunk together and each chunk is yielded as
    soon as it is blended, so frames stream out; but every tile's causal cache is alive at once.
    "tile-major": one tile is decoded over all chunks (only its cache alive), then the next, blended into
    one whole-video buffer; nothing can be yielded before the last tile, so streaming is lost. Same frames
    bit for bit. Peak memory rise vs diffusers' untiled decode (bench/vae_decode.py: 256x256, 33 frames,
    128/32 tiles, uint8 output): chunk-major 0.75x (chunk 1) / 0.86x (chunk 2); tile-major 0.30x / 0.39x, at
    about the same time. With `workers` > 1 that many tiles are alive at once (0.46x for 2). Use it when
    memory, not time to first frame, is the limit."""

    overlap: Overlap = Field("auto", json_schema_extra=flag("--vae-overlap"))
    """Decode finished videos on a second lane of the worker (a thread; on CUDA a side stream too) while
    it goes on denoising other requests, instead of making them wait for the decode. "auto": on for a
    CUDA device that keeps every weight and has room for a decode beside the largest request's denoising
    step (the two are in memory at once), off on a CPU, where both lanes compete for the same cores (a
    CPU run shows no gain). Worker groups decode on the main lane (their tile decode is a collective).
    The frames are the same either way."""

    @field_validator("order", "overlap", mode="before")
    @classmethod
    def _known_choice(cls, value: object, info: ValidationInfo) -> object:
        choices = {"order": DECODE_ORDERS, "overlap": OVERLAPS}[info.field_name]
        if value not in choices:
            raise ValueError(f"{info.field_name} must be one of {choices}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _overlap_below_tile(self) -> VaeDecodeConfig:
        if self.tile_sample_size is not None and self.tile_sample_overlap >= self.tile_sample_size:
            raise ValueError(
                f"tile_sample_overlap must be in [0, tile_sample_size={self.tile_sample_size}), "
                f"got {self.tile_sample_overlap}; lower --vae-tile-overlap or raise --vae-tile"
            )
        return self

    @property
    def tiled(self) -> bool:
        return self.tile_sample_size is not None

    def overlaps_on(self, device: str, fits: bool) -> bool:
        """Whether a worker on `device` decodes on its second lane (`overlap`). `fits`: every weight stays
        on the device with room for a decode beside a denoising step (`factory.plan_memory`), which
        "auto" asks for."""
        return self.overlap == "on" or (self.overlap == "auto" and device.startswith("cuda") and fits)


def chunk_bounds(num_latent_frames: int, chunk_latent_frames: int) -> list[tuple[int, int]]:
    """[start, end) latent frame ranges: the first is one frame (Wan's cache starts in "Rep" mode, so a
    longer first call would skip the temporal upsample of its later frames), then `chunk_latent_frames` each."""
    bounds = [(0, min(1, num_latent_frames))]
    for start in range(1, num_latent_frames, chunk_latent_frames):
        bounds.append((start, min(start + chunk_latent_frames, num_latent_frames)))
    return bounds
