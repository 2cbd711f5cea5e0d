"""A ModelRunner stand-in for engine and API tests: no torch, deterministic frames, scripted faults.

The prompt scripts the behaviour, so a test drives the real worker process and pipe:
  "raise"       the runner raises (a per-request failure; the worker survives)
  "exit"        the worker process dies mid-request (after reporting one step)
  "sleep:<s>"   the generation takes <s> seconds
  "bad-shape"   the runner returns frames of the wrong size
anything else   frames from `fake_frames(params)`.
Set REELSERVE_FAKE_LOAD_DELAY_S before a (re)start to make the worker's load slow, and
REELSERVE_FAKE_LOAD_FAIL to make it fail (spawned workers inherit the environment).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from serve.engine.request import GenerationParams

FACTORY = "tests.engine.fake_runner:load_fake_runner"
BROKEN_FACTORY = "tests.engine.fake_runner:load_broken_runner"
LOAD_DELAY_ENV = "REELSERVE_FAKE_LOAD_DELAY_S"
LOAD_FAIL_ENV = "REELSERVE_FAKE_LOAD_FAIL"


@dataclass
class FakeOutput:
    frames: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


def fake_frames(params: GenerationParams) -> np.ndarray:
    """A gradient that differs per seed and per frame, so mix-ups between requests show."""
    f, y, x = np.meshgrid(
        np.arange(params.num_frames), np.arange(params.height), np.arange(params.width), indexing="ij"
    )
    channels = [(x * 4 + params.seed) % 256, (y * 4 + f * 16) % 256, np.full_like(x, params.seed * 7 % 256)]
    return np.stack(channels, axis=-1).astype(np.uint8)


class FakeRunner:
    def generate(self, params: GenerationParams, on_step: Callable[[int, int], None] | None = None) -> FakeOutput:
        on_step = on_step or (lambda i, n: None)
        on_step(1, params.num_inference_steps)
        if params.prompt == "raise":
            raise RuntimeError("fake runner was told to fail")
        if params.prompt == "exit":
            os._exit(3)
        if params.prompt.startswith("sleep:"):
            time.sleep(float(params.prompt.split(":", 1)[1]))
        frames = fake_frames(params)
        if params.prompt == "bad-shape":
            frames = frames[:, :8]
        return FakeOutput(frames, {"text_encode": 0.001, "denoise": 0.002, "decode": 0.003})


def load_fake_runner(model_dir: str, device: str, dtype: str) -> FakeRunner:
    time.sleep(float(os.environ.get(LOAD_DELAY_ENV, "0")))
    if os.environ.get(LOAD_FAIL_ENV):
        raise RuntimeError("fake load failure")
    return FakeRunner()


def load_broken_runner(model_dir: str, device: str, dtype: str) -> FakeRunner:
    raise FileNotFoundError(f"no weights in {model_dir}")
