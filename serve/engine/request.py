"""What a request is, independent of HTTP and of torch (the scheduler imports this; no torch here)."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

SAMPLERS = ("unipc", "euler")


@dataclass(frozen=True)
class ConditionImage:
    """A conditioning image (image-to-video), already cropped and resized to the request's size:
    8-bit RGB, row-major, `height * width * 3` bytes. Plain bytes, so it pickles to the worker
    without torch; the worker VAE-encodes it and keeps the latents there."""

    width: int
    height: int
    rgb: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.rgb) != self.width * self.height * 3:
            raise ValueError(f"{len(self.rgb)} bytes is not a {self.width}x{self.height} RGB image")


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
    image: ConditionImage | None = None
    """Image-to-video: the first frame's conditioning image, at (height, width). Not in the batch
    key: requests with different images share a step (the image enters as extra input channels)."""

    @property
    def uses_cfg(self) -> bool:
        """diffusers decides CFG from the high-noise scale alone; we follow it so outputs match."""
        return self.guidance_scale > 1.0


class RequestStatus(enum.IntEnum):
    """Ordered: a request only ever moves to a larger value (cancelled/failed may come from any)."""

    WAITING = 0  # queued, on no worker yet
    ENCODING = 1  # text encode + initial latents on its worker
    DENOISING = 2  # one step at a time; `step` of `total_steps` done
    DECODING = 3  # VAE decode + MP4 encode
    FINISHED = 4
    FAILED = 5
    CANCELLED = 6

    @property
    def is_done(self) -> bool:
        return self >= RequestStatus.FINISHED


_ids = itertools.count(1)


def new_request_id() -> str:
    return f"req-{int(time.time() * 1000):x}-{next(_ids)}"


@dataclass(eq=False)
class Request:
    """A request's state as the scheduler sees it: plain data, mutated only by the scheduler."""

    params: GenerationParams
    request_id: str = field(default_factory=new_request_id)
    status: RequestStatus = RequestStatus.WAITING
    step: int = 0
    error: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    deadline: float = float("inf")  # monotonic seconds; past it the request fails
    batch_key: object = None  # BatchKey, set by the scheduler on admission
    worker: int | None = None  # the worker that holds its latents, from encoding on
    experts: tuple[int, ...] = ()  # expert index of each step, reported by the worker after encoding
    cancel_requested: bool = False
    retries: int = 0  # times started over from step 0 after its worker died mid-way
    last_scheduled: float = 0.0  # when a unit of this request last ran (starvation bound)
    timings: dict[str, float] = field(default_factory=dict)
    trace: list[tuple[str, int, int]] = field(default_factory=list)  # (unit kind, worker, batch size) per unit
    output: str = "scratch"  # the artifact store its MP4 goes to (a name in WorkerArgs.outputs)

    @property
    def total_steps(self) -> int:
        return len(self.experts) or self.params.num_inference_steps

    @property
    def next_expert(self) -> int:
        return self.experts[self.step]

    @property
    def progress(self) -> int:
        """0-100 for the job API: encoding counts as 0, each step adds its share, decode is the last 5%."""
        if self.status == RequestStatus.FINISHED:
            return 100
        return int(95 * self.step / max(1, self.total_steps))
