"""Decode a finished request in the background while the same device keeps denoising.

One background thread per device; on CUDA the decode also runs on a side stream, ordered after the
work that produced the latents (an event recorded on the caller's stream), so the two overlap on the
GPU. On a CPU the thread only helps when denoising leaves cores idle: both compete for the same cores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

Result = TypeVar("Result")


class BackgroundDecode:
    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        # A new thread starts with OpenMP's default thread count, not the caller's; oneDNN's sums depend
        # on it, so inherit it to decode exactly as the synchronous path does.
        threads = torch.get_num_threads()
        self._executor = ThreadPoolExecutor(1, "vae-background", initializer=torch.set_num_threads, initargs=(threads,))
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def submit(self, fn: Callable[..., Result], latents: torch.Tensor, *args) -> Future[Result]:
        """Run fn(latents, *args) in the background (e.g. `stream_decode_to_mp4` bound to a stage).
        The caller must not modify `latents` in place afterwards; reassigning its variable is fine."""
        ready = _record_event(self.device)
        return self._executor.submit(self._run, fn, latents, ready, args)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def _run(self, fn: Callable[..., Result], latents: torch.Tensor, ready, args: tuple) -> Result:
        with torch.inference_mode(), self._side_stream(latents, ready):
            return fn(latents, *args)

    def _side_stream(self, latents: torch.Tensor, ready):
        if self._stream is None:
            return contextlib.nullcontext()
        self._stream.wait_event(ready)
        latents.record_stream(self._stream)  # the caching allocator must not reuse it under the side stream
        return torch.cuda.stream(self._stream)


def _record_event(device: torch.device):
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event
