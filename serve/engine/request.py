"""What a request is, independent of HTTP and of torch (the scheduler imports this; no torch here)."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

SAMPLERS = ("unipc", "euler")


@dataclass(frozen=True)
class GenerationParams:
    """One fully resolved generation: every default filled in, every value already within limits.

    `seed` is always concrete (the API draws one when the client gives none) so a result can be
    reproduced from the response headers alone.
    """

    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    guidance_scale_2: float
    seed: int
    sampler: str = "unipc"
    lossless: bool = False
    preset: str | None = None
    """A named few-step schedule (e.g. "lightning-4step"): fixes timesteps, expert split and guidance."""
    loras: tuple[tuple[str, float], ...] = ()
    """Per-request LoRA set: (name of a LoRA the server knows, scale). Part of the batch key."""

    @property
    def uses_cfg(self) -> bool:
        """diffusers decides CFG from the high-noise scale alone; we follow it so outputs match."""
        return self.guidance_scale > 1.0


class RequestStatus(enum.IntEnum):
    """Ordered: a request only ever moves to a larger value."""

    WAITING = 0
    RUNNING = 1
    FINISHED = 2
    FAILED = 3
    CANCELLED = 4

    @property
    def is_done(self) -> bool:
        return self >= RequestStatus.FINISHED


_ids = itertools.count(1)


def new_request_id() -> str:
    return f"req-{int(time.time() * 1000):x}-{next(_ids)}"


@dataclass
class Request:
    params: GenerationParams
    request_id: str = field(default_factory=new_request_id)
    status: RequestStatus = RequestStatus.WAITING
    step: int = 0
    error: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def total_steps(self) -> int:
        return self.params.num_inference_steps
