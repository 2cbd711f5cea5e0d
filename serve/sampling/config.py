"""Sampling defaults of a server: the few-step preset for requests that name none, and the
first-block step cache every request gets. Torch-free (the API applies presets too)."""

from __future__ import annotations

from pydantic import Field, field_validator

from serve.frozen import FrozenConfig, flag
from serve.sampling.presets import PRESETS


class SamplingConfig(FrozenConfig):
    """How every request is sampled unless it says otherwise."""

    preset: str | None = Field(None, json_schema_extra=flag("--preset", choices=sorted(PRESETS)))
    """Few-step preset for requests that name none (`--preset lightning-4step`), for a server of a
    distilled model: it fixes the steps, the timesteps and turns CFG off."""
    step_cache_threshold: float | None = Field(None, ge=0)
    """First-block step cache threshold for every request (`--step-cache-threshold 0.05`): reuse the
    transformer residual while the first block's output barely changes; off by default."""

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; use one of {', '.join(sorted(PRESETS))}")
        return value
