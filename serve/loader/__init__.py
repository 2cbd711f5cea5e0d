"""Streaming safetensors loader: config.json -> module on meta -> tensors one at a time onto the device.

Typical use: `load_component("<model>/transformer", "cuda:0", torch.bfloat16)`.
"""

from serve.loader.errors import CheckpointError
from serve.loader.index import CheckpointIndex, TensorInfo, read_header
from serve.loader.load import load_component

__all__ = ["CheckpointError", "CheckpointIndex", "TensorInfo", "load_component", "read_header"]
