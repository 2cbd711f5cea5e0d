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
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.demo.data import COLOURS, Combo, held_out_combos, train_combos

if TYPE_CHECKING:
    from serve.engine.request import ConditionImage

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


# ---------------------------------------------------------------- image-to-video (models/demo/i2v_train.py)
#
# The I2V demo is prompted with the direction alone ("moving left"); the conditioning image, the
# first frame of a rendered clip, is the only source of the object's colour, shape, size and start
# position. Each case is read back from the video: colour and direction as above, start position
# from the object's centroid in frame 0, shape from how much of its bounding box the object fills.
# Shape is reported but not part of "all": the detector is exact on rendered clips, but the demo
# VAE's own encode-decode round trip already blurs squares and discs into the same blob (median
# fill 0.80-0.88 for squares, 0.82-0.87 for discs), so no video decoded by it can show the shape.

SQUARE_FILL = 0.9  # a square fills its bounding box (about 1.0), a disc about pi/4 (0.79) of it
START_TOLERANCE = 4.0  # pixels: a start "in place" is within this of the image's object centroid
I2V_IMAGE_SEED = 20_000  # case images come from their own seeds, none a training clip's stream


def detect_shape(frames: np.ndarray) -> str | None:
    """square or disc: the median over frames of the object's pixel count over its bounding box's
    area; None when the object is missing in most frames."""
    ratios = []
    for frame_mask in object_mask(frames):
        rows, cols = np.nonzero(frame_mask)
        if rows.size >= MIN_OBJECT_PIXELS:
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            ratios.append(rows.size / box)
    if len(ratios) < max(1, frames.shape[0] // 2):
        return None
    return "square" if statistics.median(ratios) >= SQUARE_FILL else "disc"


def object_centroid(frame: np.ndarray) -> tuple[float, float] | None:
    """(x, y) in pixels of the object in one uint8 frame (H, W, 3); None without an object."""
    rows, cols = np.nonzero(object_mask(frame[None])[0])
    if rows.size < MIN_OBJECT_PIXELS:
        return None
    return float(cols.mean()), float(rows.mean())


@dataclass(frozen=True)
class I2VCase:
    """One image-to-video request: the first frame of a rendered clip of `combo` as the image."""

    combo: Combo
    seed: int  # the generation seed; the image's clip has its own
    image: ConditionImage = field(repr=False)
    start: tuple[float, float] = (0.0, 0.0)  # the image's object centroid (x, y), pixels

    @property
    def prompt(self) -> str:
        from models.demo.i2v_train import direction_prompt

        return direction_prompt(self.combo.direction)


def i2v_case(combo: Combo, seed: int) -> I2VCase:
    """The case for `combo` and `seed`; its image depends on both (position, size, background)."""
    from models.demo.data import all_combos, render_clip
    from models.demo.i2v_train import condition_image

    gen = torch.Generator().manual_seed(I2V_IMAGE_SEED + 1000 * seed + all_combos().index(combo))
    image = condition_image(render_clip(combo, gen)[0])
    first = np.frombuffer(image.rgb, np.uint8).reshape(image.height, image.width, 3)
    start = object_centroid(first)
    assert start is not None, combo
    return I2VCase(combo, seed, image, start)


def i2v_cases(combos: Iterable[Combo], seeds: Iterable[int]) -> list[I2VCase]:
    seeds = list(seeds)
    return [i2v_case(combo, seed) for combo in combos for seed in seeds]


@dataclass
class I2VScore:
    """Counts over one set of image-to-video cases."""

    videos: int = 0
    colour_right: int = 0
    shape_right: int = 0
    direction_right: int = 0
    all_right: int = 0  # colour and direction right and the start within START_TOLERANCE (not shape)
    start_errors: list[float] = field(default_factory=list)  # inf when frame 0 has no object
    seconds: list[float] = field(default_factory=list)

    def add(self, case: I2VCase, frames: np.ndarray, seconds: float) -> None:
        colour_ok = detect_colour(frames) == case.combo.colour
        shape_ok = detect_shape(frames) == case.combo.shape
        direction_ok = detect_direction(frames) == case.combo.direction
        start = object_centroid(frames[0])
        error = float("inf") if start is None else float(np.hypot(start[0] - case.start[0], start[1] - case.start[1]))
        self.videos += 1
        self.colour_right += colour_ok
        self.shape_right += shape_ok
        self.direction_right += direction_ok
        self.all_right += colour_ok and direction_ok and error <= START_TOLERANCE
        self.start_errors.append(error)
        self.seconds.append(seconds)

    @property
    def colour_accuracy(self) -> float:
        return self.colour_right / max(1, self.videos)

    @property
    def shape_accuracy(self) -> float:
        return self.shape_right / max(1, self.videos)

    @property
    def direction_accuracy(self) -> float:
        return self.direction_right / max(1, self.videos)

    @property
    def all_accuracy(self) -> float:
        return self.all_right / max(1, self.videos)

    @property
    def median_start_error(self) -> float:
        return statistics.median(self.start_errors) if self.start_errors else float("nan")

    @property
    def start_accuracy(self) -> float:
        """The fraction of videos whose object starts within START_TOLERANCE of the image's."""
        return sum(e <= START_TOLERANCE for e in self.start_errors) / max(1, self.videos)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")


GenerateI2V = Callable[[str, "ConditionImage | None", int], np.ndarray]
"""(prompt, ConditionImage or None, seed) -> uint8 frames (T, H, W, 3)."""


def evaluate_i2v(
    generate: GenerateI2V, cases: Iterable[I2VCase], prompt: Callable[[I2VCase], str] | None = None
) -> I2VScore:
    """Every case once; `prompt` replaces the direction prompt (e.g. the full caption, for the T2V
    control)."""
    score = I2VScore()
    for case in cases:
        start = time.perf_counter()
        frames = generate(case.prompt if prompt is None else prompt(case), case.image, case.seed)
        score.add(case, frames, time.perf_counter() - start)
    return score


def evaluate_i2v_splits(generate: GenerateI2V, seeds: Iterable[int]) -> dict[str, I2VScore]:
    """Every trained and every held-out combination as an image, each with `seeds`."""
    seeds = list(seeds)
    return {
        "trained": evaluate_i2v(generate, i2v_cases(train_combos(), seeds)),
        "held-out": evaluate_i2v(generate, i2v_cases(held_out_combos(), seeds)),
    }


def runner_generate_i2v(runner, **overrides) -> GenerateI2V:
    """`runner_generate` with the conditioning image: a `GenerateI2V` over an image-to-video
    ModelRunner (the image must already be at the request's size, as the API leaves it)."""
    from models.wan.spec import WanSpec
    from serve.api.params import fill_defaults
    from serve.api.schemas import GenerateRequest
    from serve.engine.request import GenerationParams
    from serve.sampling.presets import apply_preset

    spec: WanSpec = runner.spec

    def generate(prompt: str, image: ConditionImage | None, seed: int) -> np.ndarray:
        values = fill_defaults(GenerateRequest(prompt=prompt, seed=seed, **overrides), spec)
        return runner.generate(apply_preset(GenerationParams(**values, image=image))).frames

    return generate


def without_image(generate: Generate) -> GenerateI2V:
    """A text-to-video `Generate` as a `GenerateI2V` that never sees the image (the T2V control)."""
    return lambda prompt, image, seed: generate(prompt, seed)


@dataclass
class SwapScore:
    """Pairs of videos with the same prompt and seed and two images of different colours and
    shapes: does each video take its own image's colour (so the two differ)?"""

    pairs: int = 0
    both_follow: int = 0  # both videos' colours are their own images' colours
    differ: int = 0  # the two videos' detected colours differ

    @property
    def follow_rate(self) -> float:
        return self.both_follow / max(1, self.pairs)

    @property
    def differ_rate(self) -> float:
        return self.differ / max(1, self.pairs)


def swap_pairs(seeds: Iterable[int]) -> list[tuple[Combo, Combo, int]]:
    """For every direction and seed, 7 pairs: each colour against the colour three along the palette,
    the shapes opposite, so the two images differ in colour and shape but share the prompt."""
    from models.demo.data import DIRECTIONS, SHAPES

    colours = PALETTE_NAMES
    return [
        (
            Combo(colours[i], SHAPES[i % 2], direction),
            Combo(colours[(i + 3) % len(colours)], SHAPES[(i + 1) % 2], direction),
            seed,
        )
        for seed in seeds
        for direction in DIRECTIONS
        for i in range(len(colours))
    ]


def evaluate_swap(generate: GenerateI2V, pairs: Iterable[tuple[Combo, Combo, int]]) -> SwapScore:
    score = SwapScore()
    for a, b, seed in pairs:
        case_a, case_b = i2v_case(a, seed), i2v_case(b, seed)
        colour_a = detect_colour(generate(case_a.prompt, case_a.image, seed))
        colour_b = detect_colour(generate(case_b.prompt, case_b.image, seed))  # same prompt, same seed
        score.pairs += 1
        score.both_follow += colour_a == a.colour and colour_b == b.colour
        score.differ += colour_a != colour_b
    return score


def format_i2v_scores(scores: dict[str, I2VScore]) -> str:
    lines = [
        f"{'split':<22}{'videos':>7}{'colour':>8}{'shape':>8}{'direction':>10}"
        f"{'start err px':>13}{'start ok':>9}{'all':>7}{'s/video':>9}"
    ]
    for name, s in scores.items():
        lines.append(
            f"{name:<22}{s.videos:>7}{s.colour_accuracy:>8.1%}{s.shape_accuracy:>8.1%}{s.direction_accuracy:>10.1%}"
            f"{s.median_start_error:>13.1f}{s.start_accuracy:>9.1%}{s.all_accuracy:>7.1%}{s.median_seconds:>9.2f}"
        )
    return "\n".join(lines)
