"""Wan2.2 TI2V-5B: one transformer on the Wan2.2 VAE (z 48, 16x spatial) with per-token timesteps
(diffusers' `expand_timesteps`), text-only or text+image.

With an image, the first latent frame is the image's latents: the transformer sees them in place
of the noise there and those tokens get timestep 0; the last step's latents get the same frame
written back before decoding. Without one, every token's timestep is the step's. Exactly
`WanPipeline` (text) and `WanImageToVideoPipeline` (image) with `expand_timesteps=True`, diffusers 0.42.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.wan.t2v import WanT2V
from models.wan.vae import encode_condition


@dataclass
class FirstFrame:
    """A TI2V request's conditioning: 0 in `mask` where the image's latents replace the noise."""

    mask: torch.Tensor  # (1, 1, F', h, w): 0 on the first latent frame with an image, else 1
    latents: torch.Tensor | None  # (1, z, 1, h, w) image latents, or None for text-only


class WanTI2V(WanT2V):
    def prepare(self, state) -> None:
        mask = torch.ones(1, 1, *state.latents.shape[2:], device=self.device)
        latents = None
        if state.params.image is not None:
            latents = encode_condition(self.vae, state.params.image, 1, self.device)
            mask[:, :, 0] = 0
        state.conditioning = FirstFrame(mask, latents)

    def model_input(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        t = state.sampler.timesteps[state.step]
        _, patch_h, patch_w = self.spec.patch_size
        mask = state.conditioning.mask
        timesteps = (mask[0, 0, :, ::patch_h, ::patch_w] * t).flatten().unsqueeze(0)  # (1, tokens)
        return self.final_latents(state), timesteps

    def final_latents(self, state) -> torch.Tensor:
        first = state.conditioning
        if first.latents is None:
            return state.latents
        return (1 - first.mask) * first.latents + first.mask * state.latents
