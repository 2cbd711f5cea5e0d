"""Which requests may share a forward pass. Pure Python: the scheduler imports it (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

from serve.engine.request import GenerationParams


@dataclass(frozen=True)
class BatchKey:
    """Only requests with equal keys share a batch.

    Everything here changes either a tensor shape (size, frames), the transformer's weights
    (model, LoRA set, quantization) or the shape of a step (CFG doubles the batch; the sampler
    and its schedule decide each step's timestep and expert). Guidance *values* and seeds are
    per sample and may differ within a batch.
    """

    model: str
    height: int
    width: int
    num_frames: int
    sampler: str
    num_inference_steps: int
    preset: str | None
    cfg: bool
    loras: tuple[tuple[str, float], ...]
    quantization: str


def batch_key(params: GenerationParams, model: str, quantization: str = "none") -> BatchKey:
    return BatchKey(
        model=model,
        height=params.height,
        width=params.width,
        num_frames=params.num_frames,
        sampler=params.sampler,
        num_inference_steps=params.num_inference_steps,
        preset=params.preset,
        cfg=params.uses_cfg,
        loras=tuple(sorted(params.loras)),
        quantization=quantization,
    )


def latent_tokens(height: int, width: int, num_frames: int, temporal: int = 4, spatial: int = 16) -> int:
    """Transformer sequence length: latent frames x (height/16) x (width/16) for Wan (VAE 4x8x8, patch 1x2x2)."""
    return ((num_frames - 1) // temporal + 1) * (height // spatial) * (width // spatial)
