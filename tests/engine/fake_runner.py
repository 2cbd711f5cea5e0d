"""A ModelRunner stand-in for engine and API tests: no torch, deterministic frames, scripted faults.

It implements the same `Runner` protocol as the real runner (serve/worker/runner.py): start,
experts_of, denoise_step, decode_chunks, counters, calibrate. So a test drives the real worker
process, pipe, scheduler and the production decode path (chunks streamed into MP4 encoders).
The prompt scripts the behaviour:
  "raise"         a denoising step raises (a per-batch failure; the worker survives)
  "encode-raise"  text encoding raises
  "exit"          the worker process dies at the request's second step
  "oom:<n>"       a denoising step of a batch of more than <n> requests raises `OutOfMemoryError`
                  (named as torch's is) before it changes any state, as a forward pass would
  "sleep:<s>"     the request's denoising takes about <s> seconds in all
  "bad-shape"     decoding returns frames of the wrong size
  "decode-waits-for-step:<s>"
                  decoding waits up to <s> seconds for a denoising step (of another request) to run
                  meanwhile, and raises if none did: it finishes only on a worker with a decode lane
  "decode-exit-once:<file>"
                  the worker process dies while decoding the request, unless <file> exists (it is
                  created first): the retry from its seed decodes
  "noise"         frames of seeded random noise (an MP4 that does not compress: fills a disk)
anything else     frames from `fake_frames(params)`.
A step changes each request's state as it goes (a batch-mate after it may still raise), and
decoding a request that did not take exactly its steps raises, so a step run twice shows.
Set REELSERVE_FAKE_LOAD_DELAY_S before a (re)start to make the worker's load slow, and
REELSERVE_FAKE_LOAD_FAIL to make it fail (spawned workers inherit the environment).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serve.engine.request import GenerationParams

FACTORY = "tests.engine.fake_runner:load_fake_runner"
BROKEN_FACTORY = "tests.engine.fake_runner:load_broken_runner"
LOAD_DELAY_ENV = "REELSERVE_FAKE_LOAD_DELAY_S"
LOAD_FAIL_ENV = "REELSERVE_FAKE_LOAD_FAIL"


def fake_frames(params: GenerationParams) -> np.ndarray:
    """A gradient that differs per seed and per frame, so mix-ups between requests show."""
    if params.prompt == "noise":
        shape = (params.num_frames, params.height, params.width, 3)
        return np.random.default_rng(params.seed).integers(0, 256, shape, dtype=np.uint8)
    f, y, x = np.meshgrid(
        np.arange(params.num_frames), np.arange(params.height), np.arange(params.width), indexing="ij"
    )
    channels = [(x * 4 + params.seed) % 256, (y * 4 + f * 16) % 256, np.full_like(x, params.seed * 7 % 256)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def fake_experts(num_steps: int) -> tuple[int, ...]:
    """First half of the steps on the high-noise expert, the rest on the low-noise one."""
    high = (num_steps + 1) // 2
    return (0,) * high + (1,) * (num_steps - high)


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.OutOfMemoryError: the worker knows it by its name."""


@dataclass(eq=False)
class FakeState:
    params: GenerationParams
    step: int = 0


class FakeRunner:
    def __init__(self) -> None:
        self.steps_run = 0  # denoising steps taken, by any request (read by a decode on the lane)

    def start(self, params_list: list[GenerationParams]) -> list[FakeState]:
        if any(p.prompt == "encode-raise" for p in params_list):
            raise RuntimeError("fake text encoder was told to fail")
        return [FakeState(p) for p in params_list]

    def experts_of(self, state: FakeState) -> tuple[int, ...]:
        return fake_experts(state.params.num_inference_steps)

    def denoise_step(self, states: list[FakeState], expert: int) -> None:
        for s in states:
            prompt = s.params.prompt
            if prompt.startswith("oom:") and len(states) > int(prompt.split(":", 1)[1]):
                raise OutOfMemoryError(f"fake: a batch of {len(states)} does not fit")
        for s in states:
            if self.experts_of(s)[s.step] != expert:
                raise RuntimeError("scheduler sent a request to the wrong expert")
            prompt = s.params.prompt
            if prompt == "raise":
                raise RuntimeError("fake runner was told to fail")
            if prompt == "exit" and s.step == 1:
                os._exit(3)
            if prompt.startswith("sleep:"):
                time.sleep(float(prompt.split(":", 1)[1]) / s.params.num_inference_steps)
            s.step += 1
        self.steps_run += 1

    def decode_chunks(self, states: list[FakeState]) -> Iterator[np.ndarray]:
        """The batch's frames in the chunks a causal VAE yields: the first frame, then four at a time."""
        for s in states:
            if s.step != len(self.experts_of(s)):
                raise RuntimeError(f"decoding after {s.step} of {len(self.experts_of(s))} steps")
            if s.params.prompt.startswith("decode-exit-once:"):
                marker = Path(s.params.prompt.split(":", 1)[1])
                if not marker.exists():
                    marker.touch()
                    os._exit(3)
            if s.params.prompt.startswith("decode-waits-for-step:"):
                self._wait_for_a_step(float(s.params.prompt.split(":", 1)[1]))
        videos = np.stack([self._frames(s) for s in states])
        for start in range(0, videos.shape[1], 4):
            yield videos[:, max(0, start - 3) : start + 1]

    def counters(self, state: FakeState) -> dict[str, int]:
        return {}

    def calibrate(self) -> list[tuple[int, int, float]]:
        return []

    def _wait_for_a_step(self, timeout_s: float) -> None:
        before, deadline = self.steps_run, time.monotonic() + timeout_s
        while self.steps_run == before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no denoising step ran while this request decoded ({timeout_s:g} s)")
            time.sleep(0.005)

    @staticmethod
    def _frames(state: FakeState) -> np.ndarray:
        frames = fake_frames(state.params)
        return frames[:, :8] if state.params.prompt == "bad-shape" else frames


def load_fake_runner(model_dir: str, device: str, dtype: str, options=None) -> FakeRunner:
    time.sleep(float(os.environ.get(LOAD_DELAY_ENV, "0")))
    if os.environ.get(LOAD_FAIL_ENV):
        raise RuntimeError("fake load failure")
    return FakeRunner()


def load_broken_runner(model_dir: str, device: str, dtype: str, options=None) -> FakeRunner:
    raise FileNotFoundError(f"no weights in {model_dir}")
