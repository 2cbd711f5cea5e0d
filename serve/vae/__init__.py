"""The generic half of chunked + tiled + parallel VAE decode: tile grids and blending, temporal
chunks, worker pools, the decode config. A family's causal decoder uses them
(models/wan/vae_decode.py)."""

# Exports load on first use (PEP 562): the package's torch-free config module
# (`serve.vae.config`) must import without pulling torch into the API process.
import importlib

_EXPORTS = {
    "VaeDecodeConfig": "serve.vae.config",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
