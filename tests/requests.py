"""A resolved request for tests, so each test names only the fields it cares about."""

from __future__ import annotations

from pathlib import Path

from models.wan.spec import WanSpec
from serve.engine.request import GenerationParams
from serve.sampling.presets import apply_preset

# The tiny checkpoints' geometry (Wan2.1 VAE 4x8x8, patch 1x2x2), for scheduler tests that have
# no checkpoint: `tokens` is the scheduler's token counter there.
TINY_SPEC = WanSpec(Path("tiny"), ("transformer", "transformer_2"), 0.875, 4, 8, (1, 2, 2), 16, {})
tokens = TINY_SPEC.tokens

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
    """Small, CFG on, both experts used; `overrides` change any field. Resolved as the API
    resolves a request: a preset's steps, sampler and guidance replace the fields it fixes."""
    return apply_preset(GenerationParams(**(BASE | overrides)))
