"""Live activation bytes of a piece of torch code on any device, CPU included (where torch keeps no
allocator statistics): what the activation estimate in `serve.loader.memory_model` is checked against.

`LiveBytes` is a dispatch mode: every tensor an op returns whose storage is new (not one of the op's
inputs: views and in-place results are not allocations) is counted until the last tensor on that
storage is freed. Tensors created before the mode (weights, inputs) are not counted. This is the
bytes the code asks for, without the allocator's rounding and caching.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [tensors alive on it, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out

    def _track(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        key, nbytes = _storage_key(tensor), tensor.untyped_storage().nbytes()
        entry = self._storages.get(key)
        if entry is not None:
            entry[0] += 1
        elif key in inputs or nbytes == 0:
            return  # a view or an in-place result of something allocated outside the mode
        else:
            self._storages[key] = [1, nbytes]
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self._storages[key]
            self.live -= entry[1]


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def peak_live_bytes(fn, *args, **kwargs) -> int:
    """Peak bytes allocated and alive at once while `fn(*args, **kwargs)` runs (its result included)."""
    meter = LiveBytes()
    with meter:
        result = fn(*args, **kwargs)
    del result
    return meter.peak
