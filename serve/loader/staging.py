"""How a tensor read from a shard reaches its device: copied, shared with the file's mapping, or staged.

- `copy_to`: an owned copy on the device in the target dtype (the default off the CPU fast path).
- `zero_copy_or_copy`: on the CPU, when the stored dtype is the target dtype, the tensor safetensors
  hands out is a view of the file's (private, copy-on-write) mapping; keeping it costs no read and no
  memory until a page is touched, and the pages are file-backed, so the kernel can drop and re-read
  them under pressure instead of swapping. The price: the file must not be truncated or rewritten in
  place while the model is loaded (a replaced file, renamed over, is safe: the old inode stays).
- `StagedCopier`: to an accelerator through a bounded staging buffer in pinned host memory, copied on
  a side stream, two buffers per reader so the host fills one while the device drains the other. The
  bytes go raw and the cast to the target dtype runs on the device. The buffer logic is the same on a
  CPU (plain host buffers, synchronous copies), which is how it is tested without a GPU; only
  `_host_buffer`, `_side_stream` and `_record` differ on CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

Placer = Callable[[torch.Tensor, torch.device, torch.dtype], torch.Tensor]
"""(stored tensor, device, target dtype) -> the tensor the module keeps."""

# Per buffer; a reader holds two. 64 MiB keeps a transfer well past the size where PCIe copies reach
# their bandwidth while a 4-reader load pins at most 512 MiB.
STAGING_BYTES = 64 * 2**20


def copy_to(stored: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An owned copy: it lets the file's mapping go when the file closes."""
    return stored.to(device=device, dtype=dtype, copy=True)


def zero_copy_or_copy(stored: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The mapped tensor itself when it is already what the module needs, else an owned copy."""
    if device.type == "cpu" and stored.dtype == dtype:
        return stored
    return copy_to(stored, device, dtype)


class StagedCopier:
    """Copies tensors to `device` through two reusable staging buffers of `buffer_bytes` each.

    Not thread-safe: one per reader. Call `finish()` before the tensors are used (it waits for the
    side stream); the tensors are allocated on the caller's stream, which the side stream waits for
    first, so memory the caller just freed is not written while its old kernels may still read it."""

    def __init__(self, device: torch.device, buffer_bytes: int = STAGING_BYTES) -> None:
        self.device = device
        pin = device.type == "cuda"
        self._buffers = [_host_buffer(buffer_bytes, pin) for _ in range(2)]
        self._done: list[object | None] = [None, None]  # per buffer: the copy that last read it
        self._next = 0
        self._stream = _side_stream(device)
        self.chunks = 0  # staging round trips so far (tests check the buffers were reused)

    def __call__(self, stored: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        raw = torch.empty(stored.nbytes, dtype=torch.uint8, device=self.device)
        source = stored.contiguous().reshape(-1).view(torch.uint8)
        step = self._buffers[0].numel()
        for start in range(0, stored.nbytes, step):
            self._stage(raw[start : start + step], source[start : start + step])
        placed = raw.view(stored.dtype).view(stored.shape)
        if placed.dtype == dtype:
            return placed
        # Allocated on the caller's stream like `raw`, so no block of the result belongs to the side stream.
        out = torch.empty(stored.shape, dtype=dtype, device=self.device)
        with _on_stream(self._stream):
            out.copy_(placed)  # the cast runs on the device, after the raw bytes landed (same stream)
        _keep_until_done(raw, self._stream)
        return out

    def finish(self) -> None:
        """Wait until every copy has landed (the tensors are ready for any stream)."""
        if self._stream is not None:
            self._stream.synchronize()

    def _stage(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """src (host bytes) -> one staging buffer -> dst (device bytes), asynchronously where possible."""
        index = self._next
        self._next = 1 - index
        _wait(self._done[index])  # the device must have read this buffer's last contents
        buffer = self._buffers[index][: src.numel()]
        buffer.copy_(src)  # host memcpy, GIL released; the page faults of a cold file happen here
        with _on_stream(self._stream):
            dst.copy_(buffer, non_blocking=self._stream is not None)
        self._done[index] = _record(self._stream)
        self.chunks += 1


def _host_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def _side_stream(device: torch.device):
    """A copy stream that first waits for the caller's stream (see `StagedCopier`); None on a CPU."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream


def _on_stream(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _record(stream):
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _keep_until_done(tensor: torch.Tensor, stream) -> None:
    """`tensor` is dropped by the caller while the side stream may still read it: tell the allocator."""
    if stream is not None:
        tensor.record_stream(stream)


def _wait(event) -> None:
    if event is not None:
        event.synchronize()
