"""Fixed workers for tile jobs: job k always runs on worker k % n, so a tile's causal cache stays on
the device (and replica) that made it. Threads, because torch releases the GIL inside ops and a tile
decode is a few large ops; processes would have to ship every tile's cache back and forth."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")


class WorkerPool:
    """`n` single-thread executors, or (inline=True, n == 1) the caller's own thread."""

    def __init__(self, n: int, torch_threads_per_worker: int, inline: bool = False) -> None:
        self.size = n
        self._executors = [
            ThreadPoolExecutor(
                1, f"vae-decode-{i}", initializer=torch.set_num_threads, initargs=(torch_threads_per_worker,)
            )
            for i in range(0 if inline and n == 1 else n)
        ]

    def map(self, fn: Callable[[int, Item], Result], items: Sequence[Item]) -> list[Result]:
        """fn(worker_index, item) for every item, results in item order, on the caller's CUDA stream."""
        if not self._executors:
            return [fn(0, item) for item in items]
        stream = _callers_stream()
        futures = [
            self._executors[k % self.size].submit(_on_stream, stream, fn, k % self.size, item)
            for k, item in enumerate(items)
        ]
        return [f.result() for f in futures]

    def close(self) -> None:
        for executor in self._executors:
            executor.shutdown(wait=True)


def _callers_stream():
    """The calling thread's current CUDA stream when it is not the default one (the worker's decode lane
    decodes on a side stream): CUDA's current stream is per thread, so without it a tile thread would
    queue its kernels on the default stream, unordered with the caller's (which made the tile's input,
    and reads its output)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    stream = torch.cuda.current_stream()
    return None if stream == torch.cuda.default_stream() else stream


def _on_stream(stream, fn: Callable[[int, Item], Result], index: int, item: Item) -> Result:
    if stream is None:
        return fn(index, item)
    with torch.cuda.stream(stream):
        return fn(index, item)


def threads_per_worker(workers: int, devices: Sequence[torch.device], tiled: bool = False) -> int:
    """Split the process's intra-op threads between CPU workers (oversubscribing cores makes every
    worker slower); accelerator workers only launch kernels, so one CPU thread each is enough.

    Tiles get one thread each on a CPU: a tile decode is thousands of small ops, and every op split
    over OpenMP threads ends in a barrier that waits for the slowest thread. bench/vae_decode.py (128 px
    tiles of 256 px frames, tile-major, 2-core machine shared with other work): 1 thread per tile ran at
    a fraction of the 2-thread time, which had made tiled decode 1.6-3.5x slower than diffusers' full
    decode; the time left is the decoded-area factor of the overlaps. More workers use more cores."""
    if all(d.type == "cpu" for d in devices):
        return 1 if tiled else max(1, torch.get_num_threads() // workers)
    return 1
