"""The tiny checkpoint's VAE and seeded latents for the decode tests."""

import pytest
import torch
from diffusers import AutoencoderKLWan

from serve.loader import load_component


@pytest.fixture(scope="module")
def tiny_vae(tiny_model_dir) -> AutoencoderKLWan:
    """The tiny checkpoint's VAE (base_dim 8, dim_mult [1, 1, 1, 1], one res block per stage)."""
    return load_component(tiny_model_dir / "vae", torch.device("cpu"), torch.float32).eval()


def latents(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
