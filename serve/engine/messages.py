"""The engine/worker boundary: frozen, typed messages. Torch-free (the API process imports them).

    engine -> worker   EncodeUnit | StepUnit | DecodeUnit   (answered by one UnitReport each)
                       Free | Shutdown                       (no answer)
    worker -> engine   Ready | LoadFailed                    (once, after loading)
                       UnitReport
                       DecodeAccepted                        (a DecodeUnit taken by the decode lane:
                                                              its UnitReport follows when it is done,
                                                              and the worker takes other units meanwhile)

Only ids, params and small reports cross; latents and conditioning images' latents never leave
the worker, and neither do videos: a decode writes each MP4 into its artifact store and answers
with the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serve.engine.request import GenerationParams


@dataclass(frozen=True)
class EncodeUnit:
    """Text-encode these requests in one batch, prepare their latents (and image conditioning)."""

    unit_id: int
    requests: tuple[tuple[str, GenerationParams], ...]
    outputs: tuple[str, ...] = ()
    """Per request, the name of the artifact store its MP4 goes to (`WorkerArgs.outputs`);
    empty: the first store."""


@dataclass(frozen=True)
class StepUnit:
    """One denoising step for each request, in one forward pass of `expert`."""

    unit_id: int
    request_ids: tuple[str, ...]
    expert: int


@dataclass(frozen=True)
class DecodeUnit:
    """VAE-decode these same-shaped finished requests, streaming each into its MP4."""

    unit_id: int
    request_ids: tuple[str, ...]


Unit = EncodeUnit | StepUnit | DecodeUnit


@dataclass(frozen=True)
class DecodeAccepted:
    """The worker's decode lane (`--vae-overlap`) took this DecodeUnit: the worker is free for the next
    unit now; the decode's own UnitReport, with the same `unit_id`, comes when its videos are stored."""

    unit_id: int


@dataclass(frozen=True)
class Free:
    """Drop these requests' state (cancelled or expired between steps)."""

    request_ids: tuple[str, ...]


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Ready:
    device: str
    dtype: str
    cost_samples: tuple[tuple[int, int, float], ...] = ()
    """(tokens, rows, seconds) of timed warmup steps, for the scheduler's cost model."""
    memory_plan: str = "resident"
    """Where the weights live, as the planner chose or `--memory-mode` forced (the startup summary)."""


@dataclass(frozen=True)
class LoadFailed:
    reason: str


@dataclass(frozen=True)
class UnitReport:
    """The outcome of one unit: per-request failures, and what the scheduler or client needs."""

    unit_id: int
    failed: dict[str, str] = field(default_factory=dict)
    experts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Encode: the expert index of each step of each request."""
    outputs: dict[str, str] = field(default_factory=dict)
    """Decode: each finished request's MP4, as its key in its artifact store."""
    mp4_s: float = 0.0
    elapsed_s: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)
    """Decode: e.g. step-cache skipped/computed steps of the finished requests."""
    overlapped_units: int = 0
    """Decode on the lane: how many other units the worker ran while this decode was in progress."""


def unit_message(
    kind: str,
    unit_id: int,
    request_ids: tuple[str, ...],
    expert: int | None = None,
    params: tuple[tuple[str, GenerationParams], ...] = (),
    outputs: tuple[str, ...] = (),
) -> Unit:
    """The message for a scheduler work unit of `kind` (encode needs `params` and `outputs`,
    denoise `expert`)."""
    if kind == "encode":
        return EncodeUnit(unit_id, params, outputs)
    if kind == "denoise":
        if expert is None:
            raise ValueError("a denoise unit names its expert")
        return StepUnit(unit_id, request_ids, expert)
    if kind == "decode":
        return DecodeUnit(unit_id, request_ids)
    raise ValueError(f"unknown unit kind {kind!r}")
