"""Chunked + tiled + parallel VAE decode that streams frames (see decoder.py)."""

from serve.vae.config import VaeDecodeConfig
from serve.vae.decoder import ChunkedVaeDecoder

__all__ = ["ChunkedVaeDecoder", "VaeDecodeConfig"]
