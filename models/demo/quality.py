"""A task metric for the demo model: from decoded frames, which colour is the object and which way
does it move? Accuracy over a fixed prompt set and seeds, trained and held-out combinations apart.

The detector knows only what any viewer knows from the captions (the palette and the four
directions); it is checked against rendered ground-truth clips in the tests, where it must be
perfect, and on a random-weights checkpoint, where it must score near chance.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from models.demo.data import COLOURS, Combo, held_out_combos, train_combos

OBJECT_THRESHOLD = 0.3  # a pixel is the object's when a channel differs this much from the background
MIN_OBJECT_PIXELS = 8  # fewer and there is no object (in a frame: its centroid would be noise)
MIN_SPEED = 0.3  # pixels per frame; slower than this the object is "static", not moving anywhere

PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
PALETTE_NAMES = list(COLOURS)


def clip_to_frames(pixels: torch.Tensor) -> np.ndarray:
    """A clip as the data and the VAE hold it, (3, T, H, W) in [-1, 1], as decoded videos are:
    uint8 (T, H, W, 3)."""
    from serve.pipeline.decode import to_uint8

    return to_uint8(((pixels + 1) / 2).clamp(0, 1).permute(1, 2, 3, 0))


def background_distance(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frames in [0, 1] and each pixel's largest channel difference from its frame's median colour
    (the background: the object covers well under half of every frame), (T, H, W)."""
    x = frames.astype(np.float32) / 255.0
    background = np.median(x.reshape(x.shape[0], -1, 3), axis=1)[:, None, None, :]
    return x, np.abs(x - background).max(axis=-1)


def object_mask(frames: np.ndarray) -> np.ndarray:
    """(T, H, W) bool: the object's pixels."""
    return background_distance(frames)[1] > OBJECT_THRESHOLD


def detect_colour(frames: np.ndarray) -> str | None:
    """The palette colour nearest the mean colour of the object's core; None without an object.

    The core is the half of the object's pixels that differ most from the background: edge pixels
    (anti-aliasing, a decoder's blur) are mixtures of object and background colour by nature, and
    averaging them in pulls every colour towards the background's grey."""
    x, distance = background_distance(frames)
    mask = distance > OBJECT_THRESHOLD
    if mask.sum() < MIN_OBJECT_PIXELS:
        return None
    core = mask & (distance >= np.median(distance[mask]))
    mean = x[core].mean(axis=0)
    return PALETTE_NAMES[int(np.argmin(((PALETTE - mean) ** 2).sum(axis=1)))]


def detect_direction(frames: np.ndarray) -> str | None:
    """left/right/up/down from a least-squares line through the object's per-frame centroids;
    None when the object is missing in most frames or barely moves."""
    mask = object_mask(frames)
    ts, xs, ys = [], [], []
    for t, frame_mask in enumerate(mask):
        rows, cols = np.nonzero(frame_mask)
        if rows.size >= MIN_OBJECT_PIXELS:
            ts.append(t)
            xs.append(cols.mean())
            ys.append(rows.mean())
    if len(ts) < max(2, mask.shape[0] // 2):
        return None
    vx = float(np.polyfit(ts, xs, 1)[0])
    vy = float(np.polyfit(ts, ys, 1)[0])
    if max(abs(vx), abs(vy)) < MIN_SPEED:
        return None
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"  # image rows grow downwards


@dataclass
class Score:
    """Counts over one split (trained or held-out combinations)."""

    videos: int = 0
    colour_right: int = 0
    direction_right: int = 0
    both_right: int = 0
    seconds: list[float] = field(default_factory=list)

    def add(self, combo: Combo, frames: np.ndarray, seconds: float) -> None:
        colour_ok = detect_colour(frames) == combo.colour
        direction_ok = detect_direction(frames) == combo.direction
        self.videos += 1
        self.colour_right += colour_ok
        self.direction_right += direction_ok
        self.both_right += colour_ok and direction_ok
        self.seconds.append(seconds)

    @property
    def colour_accuracy(self) -> float:
        return self.colour_right / max(1, self.videos)

    @property
    def direction_accuracy(self) -> float:
        return self.direction_right / max(1, self.videos)

    @property
    def both_accuracy(self) -> float:
        return self.both_right / max(1, self.videos)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")


Generate = Callable[[str, int], np.ndarray]
"""(prompt, seed) -> uint8 frames (T, H, W, 3)."""


def evaluate(generate: Generate, combos: Iterable[Combo], seeds: Iterable[int]) -> Score:
    score = Score()
    seeds = list(seeds)
    for combo in combos:
        for seed in seeds:
            start = time.perf_counter()
            frames = generate(combo.caption, seed)
            score.add(combo, frames, time.perf_counter() - start)
    return score


def evaluate_splits(generate: Generate, seeds: Iterable[int]) -> dict[str, Score]:
    """The fixed prompt set: every trained combination and every held-out one, each with `seeds`."""
    seeds = list(seeds)
    return {
        "trained": evaluate(generate, train_combos(), seeds),
        "held-out": evaluate(generate, held_out_combos(), seeds),
    }


def runner_generate(runner, **overrides) -> Generate:
    """A `Generate` over a reelserve ModelRunner, with the model's defaults (sampler, steps,
    guidance, size) filled by the API's own `fill_defaults`; `overrides` change request fields
    and must already be valid for the model (no rounding or limit checks here)."""
    from models.wan.spec import WanSpec
    from serve.api.params import fill_defaults
    from serve.api.schemas import GenerateRequest
    from serve.engine.request import GenerationParams
    from serve.sampling.presets import apply_preset

    spec: WanSpec = runner.spec

    def generate(prompt: str, seed: int) -> np.ndarray:
        values = fill_defaults(GenerateRequest(prompt=prompt, seed=seed, **overrides), spec)
        return runner.generate(apply_preset(GenerationParams(**values))).frames

    return generate


def format_scores(scores: dict[str, Score]) -> str:
    lines = [f"{'split':<10}{'videos':>7}{'colour':>9}{'direction':>11}{'both':>8}{'s/video':>9}"]
    for name, s in scores.items():
        lines.append(
            f"{name:<10}{s.videos:>7}{s.colour_accuracy:>9.1%}{s.direction_accuracy:>11.1%}"
            f"{s.both_accuracy:>8.1%}{s.median_seconds:>9.2f}"
        )
    return "\n".join(lines)
