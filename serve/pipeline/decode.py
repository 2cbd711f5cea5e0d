"""Stage: latents -> frames with the Wan VAE, chunk by chunk (serve/vae), optionally streamed into MP4 writers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

from serve.pipeline.mp4 import stream_chunks_to_mp4s


class LatentDecoder(Protocol):
    """A model family's chunked decoder (models/wan/vae_decode.py for Wan): de-normalised latents
    in, video chunks (B, 3, f, H, W) in [-1, 1] (or uint8 with `as_uint8`) out as they finish."""

    def iter_chunks(self, z: torch.Tensor, as_uint8: bool = False) -> Iterator[torch.Tensor]: ...


class DecodeStage:
    """Decodes a batch of same-shaped latents chunk by chunk with the family's `decoder` (its
    config picks temporal chunk length, spatial tiles and workers). A batch goes through the VAE
    together: the causal decode loops over latent frames in Python, so on small videos B requests
    in one pass cost little more than one."""

    def __init__(self, vae: torch.nn.Module, decoder: LatentDecoder) -> None:
        self.vae = vae
        self.decoder = decoder
        cfg = vae.config
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)
        self._std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Float frames in [0, 1], shape (F, H, W, 3), of the first video of the batch."""
        return self.batch(latents[:1])[0]

    def batch(self, latents: torch.Tensor) -> torch.Tensor:
        """Float frames in [0, 1], shape (B, F, H, W, 3)."""
        return torch.cat(list(self.iter_frames(latents)), dim=1)

    @torch.inference_mode()
    def iter_frames(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Float frames in [0, 1], (B, f, H, W, 3) per temporal chunk, on the CPU, as each chunk finishes."""
        for video in self.decoder.iter_chunks(self._raw(latents)):  # (B, 3, f, H, W) in [-1, 1]
            yield (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).cpu()

    @torch.inference_mode()
    def iter_uint8(self, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """uint8 frames (B, f, H, W, 3) per chunk, equal to `to_uint8` of `iter_frames`: `Mp4Writer.write`
        takes one video's slice. Converted inside the decoder, so a tile-major decode keeps the whole
        video as uint8 (a quarter of float32) rather than as floats."""
        for video in self.decoder.iter_chunks(self._raw(latents), as_uint8=True):
            yield video.permute(0, 2, 3, 4, 1).cpu().numpy()

    def _raw(self, latents: torch.Tensor) -> torch.Tensor:
        """De-normalised latents in the VAE's dtype and device."""
        param = next(self.vae.parameters())
        z = latents.to(param.device, torch.float32) * self._std.to(param.device) + self._mean.to(param.device)
        return z.to(param.dtype)


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Round (not truncate) to 8 bits: truncation biases every pixel down by half a level."""
    return (frames * 255).round().to(torch.uint8).numpy()


def stream_decode_to_mp4(stage: DecodeStage, latents: torch.Tensor, sink, fps: int, lossless: bool = False) -> dict:
    """One video: `stream_decode_to_mp4s` with a batch of one."""
    return stream_decode_to_mp4s(stage, latents[:1], [sink], [fps], [lossless])


def stream_decode_to_mp4s(
    stage: DecodeStage, latents: torch.Tensor, sinks: Sequence, fps: Sequence[int], lossless: Sequence[bool]
) -> dict:
    """Decode a batch chunk by chunk straight into one MP4 per video (`stream_chunks_to_mp4s`)."""
    return stream_chunks_to_mp4s(stage.iter_uint8(latents), sinks, fps, lossless)
