"""A resolved request for tests, so each test names only the fields it cares about."""

from __future__ import annotations

from serve.engine.request import GenerationParams

BASE = dict(
    prompt="a red square moving left",
    negative_prompt="blurry",
    height=32,
    width=32,
    num_frames=5,
    fps=16,
    num_inference_steps=4,
    guidance_scale=4.0,
    guidance_scale_2=3.0,
    seed=0,
)


def make_params(**overrides) -> GenerationParams:
    """Small, CFG on, both experts used; `overrides` change any field."""
    return GenerationParams(**(BASE | overrides))
