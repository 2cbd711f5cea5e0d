"""Request -> GenerationParams resolution (no server): defaults, guidance_scale_2, rounding."""

from pathlib import Path

import pytest
from fastapi.exceptions import RequestValidationError

from models.tiny import TINY_DEFAULTS
from models.wan.spec import WanSpec
from serve.api.params import resolve
from serve.api.schemas import GenerateRequest
from serve.config import Limits


def spec(experts: tuple[str, ...]) -> WanSpec:
    return WanSpec(Path("/m"), experts, None, 4, 8, (1, 2, 2), 16, defaults=dict(TINY_DEFAULTS))


def test_guidance_scale_2_defaults_to_the_model_default_with_two_experts():
    body = GenerateRequest(prompt="a cat", guidance_scale=6)  # an int is fine for a float field
    params = resolve(body, spec(("transformer", "transformer_2")), Limits()).params
    assert (params.guidance_scale, params.guidance_scale_2) == (6.0, 3.0)


def test_guidance_scale_2_follows_guidance_scale_with_one_expert():
    params = resolve(GenerateRequest(prompt="a cat", guidance_scale=6), spec(("transformer",)), Limits()).params
    assert params.guidance_scale_2 == 6.0


def test_explicit_values_are_kept_and_only_bad_sizes_rounded():
    body = GenerateRequest(prompt="a cat", height=17, width=64, num_frames=1, seed=0, sampler="euler")
    resolved = resolve(body, spec(("transformer",)), Limits())
    assert resolved.adjustments == ("height=17->16",)
    p = resolved.params
    assert (p.height, p.width, p.num_frames, p.seed, p.sampler) == (16, 64, 1, 0, "euler")


def test_every_violated_limit_is_reported_at_once():
    body = GenerateRequest(prompt="a cat", height=4000, width=4000, fps=100)
    with pytest.raises(RequestValidationError) as raised:
        resolve(body, spec(("transformer",)), Limits())
    assert [e["loc"][1] for e in raised.value.errors()] == ["height", "width", "fps"]
