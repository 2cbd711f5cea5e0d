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
        """fn(worker_index, item) for every item, results in item order."""
        if not self._executors:
            return [fn(0, item) for item in items]
        futures = [self._executors[k % self.size].submit(fn, k % self.size, item) for k, item in enumerate(items)]
        return [f.result() for f in futures]

    def close(self) -> None:
        for executor in self._executors:
            executor.shutdown(wait=True)


def threads_per_worker(workers: int, devices: Sequence[torch.device]) -> int:
    """Split the process's intra-op threads between CPU workers (oversubscribing cores makes every
    worker slower); accelerator workers only launch kernels, so one CPU thread each is enough."""
    if all(d.type == "cpu" for d in devices):
        return max(1, torch.get_num_threads() // workers)
    return 1
