"""Streaming safetensors loader: config.json -> module on meta -> tensors one at a time onto the device.

Typical use: `load_component("<model>/transformer", "cuda:0", torch.bfloat16)`.
"""

# Exports load on first use (PEP 562): the package's torch-free config module
# (`serve.loader.config`) must import without pulling torch into the API process.
import importlib

_EXPORTS = {
    "CheckpointError": "serve.loader.errors",
    "CheckpointIndex": "serve.loader.index",
    "TensorInfo": "serve.loader.index",
    "load_component": "serve.loader.load",
    "read_header": "serve.loader.index",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
