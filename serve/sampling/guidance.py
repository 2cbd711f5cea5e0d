"""Classifier-free guidance over a batch whose first half is conditional, second half unconditional."""

from __future__ import annotations

import torch


def split_cfg(noise_pred: torch.Tensor, scale: float) -> torch.Tensor:
    """Combine a [cond; uncond] batch into the guided prediction, as diffusers' WanPipeline does."""
    cond, uncond = noise_pred.chunk(2)
    return uncond + scale * (cond - uncond)
