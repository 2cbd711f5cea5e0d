"""Classifier-free guidance over a batch whose first half is conditional, second half unconditional."""

from __future__ import annotations

import torch


def split_cfg(noise_pred: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Combine a [cond; uncond] batch into the guided prediction, as diffusers' WanPipeline does.

    `scale` may be a tensor broadcasting over the cond half (one scale per sample)."""
    cond, uncond = noise_pred.chunk(2)
    return uncond + scale * (cond - uncond)
