"""Wan2.2 image-to-video (I2V-A14B, diffusers' `WanImageToVideoPipeline` layout): the T2V stages,
plus the conditioning image VAE-encoded in the worker, where its latents stay.

Each step the transformer sees 36 channels: the 16 noise channels, a 4-channel mask (1 on the
first video frame, laid out as the VAE packs 4 frames into a latent frame) and the 16 channels of
the VAE-encoded clip [image, black frames...]. Exactly `WanImageToVideoPipeline.prepare_latents`
and its loop (diffusers 0.42, the non-`expand_timesteps` path, no CLIP image encoder).
"""

from __future__ import annotations

import dataclasses

import torch

from models.wan.t2v import WanT2V, blank_image
from models.wan.vae import encode_condition
from serve.engine.request import GenerationParams


class WanI2V(WanT2V):
    def prepare(self, state) -> None:
        params = state.params
        if params.image is None:
            raise ValueError("input_reference: this image-to-video model needs a conditioning image")
        latents = encode_condition(self.vae, params.image, params.num_frames, self.device)
        mask = first_frame_mask(state.latents, self.spec.vae_scale_temporal)
        state.conditioning = torch.cat([mask, latents], dim=1)  # (1, 4 + z, F', h, w)

    def model_input(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.cat([state.latents, state.conditioning], dim=1)
        return hidden, state.sampler.timesteps[state.step].reshape(1)

    def warmup_params(self, height: int, width: int, num_frames: int) -> GenerationParams:
        params = super().warmup_params(height, width, num_frames)
        return dataclasses.replace(params, image=blank_image(height, width))


def first_frame_mask(latents: torch.Tensor, temporal: int) -> torch.Tensor:
    """(1, temporal, F', h, w): 1 where the video frame is the given image (the first), else 0.
    Frame 0 is repeated `temporal` times so every latent frame stands for `temporal` video frames."""
    _, _, latent_frames, height, width = latents.shape
    frames = torch.zeros(1, 1, temporal * latent_frames, height, width, device=latents.device)
    frames[:, :, :temporal] = 1  # the first video frame, repeated to fill the first latent frame
    return frames.view(1, latent_frames, temporal, height, width).transpose(1, 2)
