"""Stage: seeded initial noise, drawn on the CPU so a seed gives the same video on any device."""

from __future__ import annotations

import torch

from models.wan.spec import WanSpec
from serve.engine.request import GenerationParams


def latent_shape(spec: WanSpec, params: GenerationParams) -> tuple[int, int, int, int, int]:
    frames = (params.num_frames - 1) // spec.vae_scale_temporal + 1
    return (
        1,
        spec.latent_channels,
        frames,
        params.height // spec.vae_scale_spatial,
        params.width // spec.vae_scale_spatial,
    )


def initial_latents(spec: WanSpec, params: GenerationParams, device: torch.device) -> torch.Tensor:
    """fp32 noise from a CPU generator, as diffusers' randn_tensor does with a CPU generator."""
    generator = torch.Generator("cpu").manual_seed(params.seed)
    noise = torch.randn(latent_shape(spec, params), generator=generator, dtype=torch.float32)
    return noise.to(device)
