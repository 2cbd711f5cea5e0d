"""Stage: latents -> frames with the Wan VAE (its own causal frame-by-frame decode)."""

from __future__ import annotations

import numpy as np
import torch


class DecodeStage:
    def __init__(self, vae: torch.nn.Module) -> None:
        self.vae = vae
        cfg = vae.config
        self._mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)
        self._std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """Float frames in [0, 1], shape (F, H, W, 3), for the first (only) video in the batch."""
        param = next(self.vae.parameters())
        z = latents.to(param.device, torch.float32) * self._std.to(param.device) + self._mean.to(param.device)
        video = self.vae.decode(z.to(param.dtype), return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
        frames = (video[0].float() / 2 + 0.5).clamp(0, 1)
        return frames.permute(1, 2, 3, 0).cpu()


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Round (not truncate) to 8 bits: truncation biases every pixel down by half a level."""
    return (frames * 255).round().to(torch.uint8).numpy()
