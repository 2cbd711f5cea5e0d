"""Decode finished requests on a second lane while the same device keeps denoising others.

The lane is a thread; on CUDA its work also runs on a side stream of its own, ordered after the
work that produced the latents (an event recorded on the producer's stream when it hands over),
so the two overlap on the GPU. On a CPU the thread only helps when denoising leaves cores idle:
both compete for the same cores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class SideLane:
    """Where a device's background work runs: its CUDA side stream (none on other devices)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def handoff(self) -> contextlib.AbstractContextManager[None]:
        """Call on the thread that produced the inputs, when it hands them over; enter what it returns
        on the lane's thread, around the work. Inside: the producer's thread count (a new thread starts
        with OpenMP's default, and oneDNN's sums depend on it, so the frames equal the main lane's),
        inference mode, and on CUDA the side stream, waiting for everything queued before the handoff."""
        return self._entered(_record_event(self.device), torch.get_num_threads())

    @contextlib.contextmanager
    def _entered(self, ready, threads: int) -> Iterator[None]:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            if self._stream is None:
                yield
                return
            self._stream.wait_event(ready)
            try:
                with torch.cuda.stream(self._stream):
                    yield
            finally:
                # The inputs were allocated on the producer's stream, and the work's last reference
                # to them goes when it returns: only once the side stream has finished with them may
                # the caching allocator give their memory to the producer's stream again.
                self._stream.synchronize()


def _record_event(device: torch.device):
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event
