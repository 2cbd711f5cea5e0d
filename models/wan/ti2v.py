"""Wan2.2 TI2V-5B: one transformer on the Wan2.2 VAE (z 48, 16x spatial) with per-token timesteps
(diffusers' `expand_timesteps`), text-only or text+image.

With an image, the first latent frame is the image's latents: the transformer sees them in place
of the noise there and those tokens get timestep 0; the last step's latents get the same frame
written back before decoding. Without one, every token's timestep is the step's. Exactly
`WanPipeline` (text) and `WanImageToVideoPipeline` (image) with `expand_timesteps=True`, diffusers 0.42.
"""

from __future__ import annotations

import torch

from models.wan.t2v import WanT2V
from models.wan.vae import encode_condition


class WanTI2V(WanT2V):
    def prepare(self, state) -> None:
        mask = torch.ones(1, 1, *state.latents.shape[2:], device=self.device)
        state.condition = None
        if state.params.image is not None:
            state.condition = encode_condition(self.vae, state.params.image, 1, self.device)
            mask[:, :, 0] = 0
        state.mask = mask

    def model_input(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        t = state.sampler.timesteps[state.step]
        _, patch_h, patch_w = self.spec.patch_size
        timesteps = (state.mask[0, 0, :, ::patch_h, ::patch_w] * t).flatten().unsqueeze(0)  # (1, tokens)
        return self.final_latents(state), timesteps

    def final_latents(self, state) -> torch.Tensor:
        if state.condition is None:
            return state.latents
        return (1 - state.mask) * state.condition + state.mask * state.latents
