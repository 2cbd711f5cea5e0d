"""Synthetic clips for the demo model: one coloured square or disc moving in a straight line on a
dark background, with its caption ("a red square moving left").

Everything is drawn from an explicit `torch.Generator`, so a seed gives the same clips on every
machine. Pixels are in [-1, 1] (what the VAE takes); the object's coverage mask comes with each
clip so training can weight the object's pixels (the object is ~5% of the frame, and a plain MSE
lets the VAE learn the background and grey out the colour).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

# Saturated, mutually distant colours: the harness must tell them apart from decoded frames.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.9, 0.1),
    "blue": (0.15, 0.25, 1.0),
    "yellow": (1.0, 0.95, 0.1),
    "cyan": (0.1, 0.95, 1.0),
    "magenta": (1.0, 0.1, 1.0),
    "white": (1.0, 1.0, 1.0),
}
SHAPES = ("square", "disc")
# (dx, dy) in image coordinates: y grows downwards, so "up" is -y.
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

# Held out of training; every colour, shape and direction still appears in other combinations,
# so these measure composition, not recall.
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("blue", "disc", "up"),
        ("yellow", "square", "left"),
        ("magenta", "disc", "right"),
        ("cyan", "square", "down"),
    }
)

HEIGHT = WIDTH = 64
NUM_FRAMES = 17
BACKGROUND_MAX = 0.12  # background brightness in [0, 1]: always dark
HALF_SIZE = (6.0, 8.5)  # range of the half side of a square, or the radius of a disc, in pixels
SPEED = (1.6, 2.4)  # pixels per frame


@dataclass(frozen=True)
class Combo:
    colour: str
    shape: str
    direction: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"


def all_combos() -> list[Combo]:
    return [Combo(*c) for c in itertools.product(COLOURS, SHAPES, DIRECTIONS)]


def balanced_combos() -> list[Combo]:
    """Every colour x direction once, the shape alternating (none held out): for each direction
    the 7 objects share the prompt, so only what conditions the colour can tell them apart."""
    return [
        Combo(colour, SHAPES[(i + j) % 2], direction)
        for i, colour in enumerate(COLOURS)
        for j, direction in enumerate(DIRECTIONS)
    ]


def train_combos() -> list[Combo]:
    return [c for c in all_combos() if (c.colour, c.shape, c.direction) not in HELD_OUT]


def held_out_combos() -> list[Combo]:
    return [c for c in all_combos() if (c.colour, c.shape, c.direction) in HELD_OUT]


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _coverage(shape: str, cx: torch.Tensor, cy: torch.Tensor, half: float, size: int) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of a shape centred at (cx[t], cy[t]): (T, size, size)."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dx = coords.view(1, 1, size) - cx.view(-1, 1, 1)
    dy = coords.view(1, size, 1) - cy.view(-1, 1, 1)
    if shape == "square":
        inside_x = (half - dx.abs() + 0.5).clamp(0, 1)
        inside_y = (half - dy.abs() + 0.5).clamp(0, 1)
        return inside_x * inside_y
    return (half - torch.sqrt(dx * dx + dy * dy) + 0.5).clamp(0, 1)


def render_clip(
    combo: Combo, gen: torch.Generator, num_frames: int = NUM_FRAMES, size: int = HEIGHT
) -> tuple[torch.Tensor, torch.Tensor]:
    """One clip of `combo`: pixels (3, T, size, size) in [-1, 1] and the object mask (T, size, size).

    Position, size, speed and background shade are drawn from `gen`; the path is chosen so the
    object stays wholly inside the frame for the whole clip.
    """
    half = _uniform(gen, *HALF_SIZE)
    speed = _uniform(gen, *SPEED)
    travel = speed * (num_frames - 1)
    dx, dy = DIRECTIONS[combo.direction]
    margin = half + 1.0
    # Along the motion axis, start where the whole path fits; across it, anywhere that fits.
    start_lo, start_hi = margin, size - margin - travel
    if start_hi < start_lo:
        raise ValueError(f"{num_frames} frames at up to {SPEED[1]} px/frame do not fit in {size} px")
    along = _uniform(gen, start_lo, start_hi)
    across = _uniform(gen, margin, size - margin)
    t = torch.arange(num_frames, dtype=torch.float32)
    if dx:
        cx = (along + t * speed) if dx > 0 else (size - along - t * speed)
        cy = torch.full_like(t, across)
    else:
        cy = (along + t * speed) if dy > 0 else (size - along - t * speed)
        cx = torch.full_like(t, across)
    mask = _coverage(combo.shape, cx, cy, half, size)
    background = torch.tensor([_uniform(gen, 0.0, BACKGROUND_MAX) for _ in range(3)])
    colour = torch.tensor(COLOURS[combo.colour])
    pixels = background.view(3, 1, 1, 1) + (colour - background).view(3, 1, 1, 1) * mask.unsqueeze(0)
    return pixels * 2 - 1, mask


def sample_batch(
    combos: list[Combo], batch: int, gen: torch.Generator, num_frames: int = NUM_FRAMES
) -> tuple[torch.Tensor, torch.Tensor, list[Combo]]:
    """`batch` clips of combos drawn uniformly: pixels (B, 3, T, H, W), masks (B, T, H, W), combos."""
    picks = [combos[int(i)] for i in torch.randint(len(combos), (batch,), generator=gen)]
    clips = [render_clip(c, gen, num_frames) for c in picks]
    return torch.stack([p for p, _ in clips]), torch.stack([m for _, m in clips]), picks
