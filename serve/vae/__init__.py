"""The generic half of chunked + tiled + parallel VAE decode: tile grids and blending, temporal
chunks, worker pools, the decode config. A family's causal decoder uses them
(models/wan/vae_decode.py)."""

from serve.vae.config import VaeDecodeConfig  # torch-free: the API process imports it

__all__ = ["VaeDecodeConfig"]
