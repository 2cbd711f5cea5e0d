"""Wan VAE details the shared stages do not know: latent normalisation and the image-to-video
encode of a conditioning image (Wan's causal VAE encodes the first frame on its own)."""

from __future__ import annotations

import torch

from serve.engine.request import ConditionImage


def latent_stats(vae: torch.nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latents per channel, shaped (1, z, 1, 1, 1), fp32."""
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)
    return mean.to(device), std.to(device)


def image_tensor(image: ConditionImage) -> torch.Tensor:
    """(1, 3, H, W) fp32 in [-1, 1], as diffusers' VaeImageProcessor.preprocess makes it from an
    image already at the target size (x / 255, then 2x - 1)."""
    pixels = torch.frombuffer(bytearray(image.rgb), dtype=torch.uint8).view(image.height, image.width, 3)
    return (pixels.permute(2, 0, 1).unsqueeze(0).float() / 255.0) * 2.0 - 1.0


@torch.inference_mode()
def encode_condition(
    vae: torch.nn.Module, image: ConditionImage, num_frames: int, device: torch.device
) -> torch.Tensor:
    """Normalised latents (1, z, F', h, w) of the conditioning video, the mode of the posterior
    (diffusers' `sample_mode="argmax"`). `num_frames` 1 encodes the image alone (TI2V); more pads
    it with black frames to the video's length (I2V-A14B conditions on the whole padded clip)."""
    param = next(vae.parameters())
    pixels = image_tensor(image).unsqueeze(2)  # (1, 3, 1, H, W)
    if num_frames > 1:
        pad = pixels.new_zeros(1, 3, num_frames - 1, image.height, image.width)
        pixels = torch.cat([pixels, pad], dim=2)
    latents = vae.encode(pixels.to(param.device, param.dtype)).latent_dist.mode().to(device, torch.float32)
    mean, std = latent_stats(vae, device)
    return (latents - mean) * (1.0 / std)
