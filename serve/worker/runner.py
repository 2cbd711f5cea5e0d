"""The `Runner` protocol: what a worker process calls on whatever runs the model.

The real `ModelRunner` (serve/worker/model_runner.py) and the test fake
(tests/engine/fake_runner.py) both implement it, so a test with the fake drives the production
worker, pipe, scheduler and MP4 streaming. Torch-free: states and frames are opaque to the
worker except that frames arrive as uint8 numpy chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

from serve.engine.request import GenerationParams


@runtime_checkable
class Runner(Protocol):
    def start(self, params_list: list[GenerationParams]) -> list[Any]:
        """Text-encode a batch of requests in one pass; return each one's state (latents drawn,
        conditioning prepared). The states stay in the worker."""
        ...

    def experts_of(self, state: Any) -> tuple[int, ...]:
        """The expert index of each of the request's denoising steps."""
        ...

    def denoise_step(self, states: list[Any], expert: int) -> None:
        """One step for each request, in one forward pass of `expert`."""
        ...

    def decode_chunks(self, states: list[Any]) -> Iterator[np.ndarray]:
        """Decode same-shaped finished requests together: uint8 frames (B, f, H, W, 3) per temporal
        chunk, as each chunk is ready (the worker streams them into the MP4 encoders)."""
        ...

    def counters(self, state: Any) -> dict[str, int]:
        """Per-request counters reported when it finishes (e.g. step-cache skipped/computed)."""
        ...

    def calibrate(self) -> list[tuple[int, int, float]]:
        """(tokens, rows, seconds) of timed steps for the scheduler's cost model (also warmup)."""
        ...
