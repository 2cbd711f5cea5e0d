"""Streaming safetensors loader: config.json -> module on meta -> tensors one at a time onto the device.

Typical use: `load_component("<model>/transformer", "cuda:0", torch.bfloat16)`.
"""

# Exports load on first use: the package's torch-free config module (`serve.loader.config`) must import
# without pulling torch into the API process.
from serve.lazy import lazy_exports

_EXPORTS = {
    "CheckpointError": "serve.loader.errors",
    "CheckpointIndex": "serve.loader.index",
    "TensorInfo": "serve.loader.index",
    "load_component": "serve.loader.load",
    "read_header": "serve.loader.index",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
