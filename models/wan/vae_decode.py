"""Chunked, tiled, parallel decode of a Wan latent with diffusers' `AutoencoderKLWan` modules: the
Wan-specific half of VAE decoding (its causal feature cache, patchified Wan2.2 output). The generic
half, tile grids, blending, temporal chunks and worker pools, lives in serve/vae/.

diffusers' `_decode` already walks latent frames one by one with a causal feature cache, but keeps
that cache on the VAE object (so one decode at a time) and returns the whole video at once; its
`tiled_decode` finishes each tile over all frames before the next, so no frame is complete until
the end. Here every tile owns its cache (a plain list passed to `decoder(feat_cache=...)`), all tiles
advance one temporal chunk together, and each chunk is blended and yielded as soon as it exists.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, unpatchify

from serve.pipeline.decode import DecodeStage
from serve.vae.config import VaeDecodeConfig, chunk_bounds
from serve.vae.parallel import WorkerPool, threads_per_worker
from serve.vae.tiles import BlendedCanvas, Finish, TileGrid, assemble, plan_tiles


@dataclass
class _Replica:
    """The decode half of the VAE on one device."""

    post_quant_conv: torch.nn.Module
    decoder: torch.nn.Module
    device: torch.device


@dataclass
class _TileJob:
    latent: torch.Tensor  # (B, z, f, h, w) crop of the chunk
    cache: list  # this tile's causal feature cache, mutated in place by the decoder
    first_chunk: bool


class ChunkedVaeDecoder:
    """Decodes raw VAE latents (already de-normalised) into video in [-1, 1], chunk by chunk.

    `devices`: where tiles run; worker k uses devices[k % len(devices)]. Default: the VAE's device.
    Output chunks live on devices[0]."""

    def __init__(
        self, vae: torch.nn.Module, config: VaeDecodeConfig | None = None, devices: Sequence[str | torch.device] = ()
    ) -> None:
        self.vae = vae
        self.config = config or VaeDecodeConfig()
        home = next(vae.decoder.parameters()).device
        self.devices = [torch.device(d) for d in devices] or [home]
        self._home = home
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self._patch = vae.config.patch_size or 1
        self._frames_per_latent = 2 ** sum(vae.config.temperal_downsample)
        tiled_on_cpu = self.config.tiled and self.devices[0].type == "cpu"
        threads = self.config.threads_per_worker or threads_per_worker(self.config.workers, self.devices, tiled_on_cpu)
        # Inline (the caller's thread and thread count) only where the default thread count applies.
        inline = self.config.workers == 1 and self.config.threads_per_worker is None and not tiled_on_cpu
        self._pool = WorkerPool(self.config.workers, threads, inline)

    @functools.cached_property
    def _replicas(self) -> dict[torch.device, _Replica]:
        """Built at the first decode, not at load: the oneDNN clone of a CPU decoder costs a deep copy
        of its module tree (0.05 s of a bench-size load), which a worker that never decodes on this
        object (a load benchmark, an overlap lane's copy) should not pay. First touched in the calling
        thread (`iter_chunks`, `_decode_tile_major`), never racing between tile workers."""
        return {d: _replica(self.vae, d, self._home) for d in dict.fromkeys(self.devices)}

    def grid(self, latent_height: int, latent_width: int) -> TileGrid:
        return plan_tiles(latent_height, latent_width, self.config, self.vae.spatial_compression_ratio, self._patch)

    @torch.inference_mode()
    def iter_chunks(self, z: torch.Tensor, as_uint8: bool = False) -> Iterator[torch.Tensor]:
        """Yield (B, 3, f, H, W) video chunks in [-1, 1] (or, `as_uint8`, their `to_uint8_video`); f is 1 for
        the first, 4 per latent frame after. In tile-major order all chunks come after the last tile, as
        views of one video tensor."""
        finish = _to_uint8_clamped if as_uint8 else _clamp
        self._replicas  # noqa: B018 - built here, in the caller's thread, before any tile worker reads it
        if self.config.order == "tile-major":
            video, frames = self._decode_tile_major(z, finish)
            for t0, t1 in itertools.pairwise([0, *itertools.accumulate(frames)]):
                yield video[:, :, t0:t1]
            return
        grid = self.grid(z.shape[3], z.shape[4])
        caches = [[None] * self._num_convs for _ in grid.tiles]
        for start, end in chunk_bounds(z.shape[2], self.config.chunk_latent_frames):
            chunk = z[:, :, start:end]
            tiles = zip(grid.tiles, caches, strict=True)
            jobs = [_TileJob(tile.crop(chunk), cache, first_chunk=start == 0) for tile, cache in tiles]
            decoded = self._pool.map(self._run_tile, jobs)
            del jobs, chunk
            yield finish(self._assemble(decoded, grid))

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The whole video at once, (B, 3, F, H, W): for tests and callers that need it in memory."""
        if self.config.order == "tile-major":
            return self._decode_tile_major(z, _clamp)[0]
        return torch.cat(list(self.iter_chunks(z)), dim=2)

    def _decode_tile_major(self, z: torch.Tensor, finish: Finish) -> tuple[torch.Tensor, list[int]]:
        """(video, frames per chunk). Tiles go `workers` at a time over all chunks, so only their caches
        are alive, and each piece is blended into a `BlendedCanvas` as soon as it is decoded."""
        self._replicas  # noqa: B018 - see iter_chunks
        grid = self.grid(z.shape[3], z.shape[4])
        bounds = chunk_bounds(z.shape[2], self.config.chunk_latent_frames)
        # The first latent frame decodes to one frame, every later one to `frames_per_latent`.
        frames = [1 if start == 0 else (end - start) * self._frames_per_latent for start, end in bounds]
        canvas = BlendedCanvas(grid, sum(frames), self.vae.blend_v, self.vae.blend_h, finish)
        for first in range(0, len(grid.tiles), self._pool.size):
            group = range(first, min(first + self._pool.size, len(grid.tiles)))
            caches = {index: [None] * self._num_convs for index in group}
            for (start, end), t0 in zip(bounds, itertools.accumulate([0, *frames]), strict=False):
                crops = [grid.tiles[index].crop(z[:, :, start:end]) for index in group]
                jobs = [_TileJob(crop, caches[index], start == 0) for crop, index in zip(crops, group, strict=True)]
                for index, piece in zip(group, self._pool.map(self._run_tile, jobs), strict=True):
                    canvas.add(index, t0, piece.to(self.devices[0]))
            del caches
            for index in group:
                canvas.finish_tile(index)
        video = unpatchify(canvas.out, patch_size=self._patch) if self._patch > 1 else canvas.out
        return video, frames

    def close(self) -> None:
        self._pool.close()

    def _run_tile(self, worker: int, job: _TileJob) -> torch.Tensor:
        replica = self._replicas[self.devices[worker % len(self.devices)]]
        # inference_mode is thread-local: a worker thread does not inherit the caller's.
        with torch.inference_mode(), _on_device(replica.device):
            x = replica.post_quant_conv(job.latent.to(replica.device))
            return replica.decoder(x, feat_cache=job.cache, feat_idx=[0], first_chunk=job.first_chunk)

    def _assemble(self, decoded: list[torch.Tensor], grid: TileGrid) -> torch.Tensor:
        out_device = self.devices[0]
        video = assemble([d.to(out_device) for d in decoded], grid, self.vae.blend_v, self.vae.blend_h)
        return unpatchify(video, patch_size=self._patch) if self._patch > 1 else video


def to_uint8_video(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8, rounded (truncation would bias every pixel down by half a level); the same ops in
    the same order as `DecodeStage`'s float frames followed by `to_uint8`, so both give the same bytes."""
    return ((video.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def _clamp(video: torch.Tensor) -> torch.Tensor:
    return video.clamp(-1.0, 1.0)


def _to_uint8_clamped(video: torch.Tensor) -> torch.Tensor:
    return to_uint8_video(_clamp(video))


def _replica(vae: torch.nn.Module, device: torch.device, home: torch.device) -> _Replica:
    if device != home:
        return _Replica(copy.deepcopy(vae.post_quant_conv).to(device), copy.deepcopy(vae.decoder).to(device), device)
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        return _Replica(_with_mkldnn_convs(vae.post_quant_conv), _with_mkldnn_convs(vae.decoder), device)
    return _Replica(vae.post_quant_conv, vae.decoder, device)


class _MkldnnCausalConv3d(WanCausalConv3d):
    """PyTorch sends a batch-1 fp32 conv3d to oneDNN only when N*C*T*H > 20480 (aten `use_mkldnn`), so
    tile-sized inputs fall to `slow_conv3d`, whose im2col buffer is 27x its input. Measured on a 128 px
    tile of the Wan2.1 layout at base_dim 16: oneDNN is faster and needs no such buffer. Output differs
    from the im2col path by float rounding only (about 2e-6)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dtype != torch.float32:
            return super()._conv_forward(x, weight, bias)
        return torch.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation, self.groups)


def _with_mkldnn_convs(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` sharing its parameters (no extra weight memory) whose causal convs use oneDNN."""
    clone = copy.deepcopy(module, memo={id(p): p for p in module.parameters()})
    for m in clone.modules():
        if type(m) is WanCausalConv3d:
            m.__class__ = _MkldnnCausalConv3d
    return clone


def _on_device(device: torch.device):
    """The CUDA current device is per thread; CPU needs nothing."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def wan_decode_stage(
    vae: torch.nn.Module, config: VaeDecodeConfig | None = None, devices: Sequence[str | torch.device] = ()
) -> DecodeStage:
    """The shared decode stage driving this causal decoder (tiles per `config`, on `devices`)."""
    return DecodeStage(vae, ChunkedVaeDecoder(vae, config, devices))
