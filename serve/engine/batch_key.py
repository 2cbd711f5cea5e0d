"""Which requests may share a forward pass. Pure Python: the scheduler imports it (no torch)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from serve.engine.request import GenerationParams

# (height, width, num_frames) -> the transformer's sequence length: the model spec's `tokens`
# (models/wan/spec.py), which knows the VAE's strides and the patch size of the served model.
TokenCounter = Callable[[int, int, int], int]


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
    tokens: int
    """Transformer sequence length of one sample (follows from the size; kept for the cost model)."""


def batch_key(params: GenerationParams, model: str, tokens: TokenCounter, quantization: str = "none") -> BatchKey:
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
        tokens=tokens(params.height, params.width, params.num_frames),
    )
