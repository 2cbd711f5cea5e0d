"""Stage: seeded initial noise, drawn on the CPU so a seed gives the same video on any device."""

from __future__ import annotations

import torch


def initial_latents(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """fp32 noise of `shape` (the model spec's latent shape) from a CPU generator, as diffusers'
    randn_tensor does with a CPU generator."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return noise.to(device)
