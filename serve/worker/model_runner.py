"""Runs one Wan checkpoint on one device: text encode -> latents -> denoise steps -> VAE decode.

The runner owns the modules; the stages in serve/pipeline/ do the work. Loading goes through
the streaming loader (serve/loader), so no component is ever materialised twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.wan.spec import WanSpec, read_spec
from serve.engine.request import GenerationParams
from serve.pipeline.decode import DecodeStage, to_uint8
from serve.pipeline.denoise import DenoiseStage
from serve.pipeline.latents import initial_latents
from serve.pipeline.text_encode import TextEncodeStage
from serve.sampling.flow import make_sampler

StepCallback = Callable[[int, int], None]


@dataclass
class GenerationOutput:
    frames: np.ndarray  # uint8, (num_frames, height, width, 3)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage


@dataclass
class WanComponents:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    experts: list[torch.nn.Module]  # [transformer] or [transformer, transformer_2]
    scheduler_config: dict


def load_components(spec: WanSpec, device: torch.device, dtype: torch.dtype) -> WanComponents:
    from transformers import AutoTokenizer

    from serve.loader import load_component

    root = spec.model_dir
    return WanComponents(
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder=load_component(root / "text_encoder", device, dtype),
        # The VAE stays fp32: diffusers' Wan docs recommend it, bf16 decode visibly degrades frames.
        vae=load_component(root / "vae", device, torch.float32),
        experts=[load_component(root / name, device, dtype) for name in spec.expert_names],
        scheduler_config=json.loads((root / "scheduler" / "scheduler_config.json").read_text()),
    )


class ModelRunner:
    def __init__(self, spec: WanSpec, components: WanComponents, device: torch.device) -> None:
        self.spec = spec
        self.device = device
        self.scheduler_config = components.scheduler_config
        self.text_encode = TextEncodeStage(components.tokenizer, components.text_encoder)
        self.denoise = DenoiseStage(components.experts, spec.boundary_timestep())
        self.decode = DecodeStage(components.vae)

    @classmethod
    def from_checkpoint(
        cls, model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> ModelRunner:
        spec = read_spec(model_dir)
        torch_device = torch.device(device)
        return cls(spec, load_components(spec, torch_device, dtype), torch_device)

    def generate(self, params: GenerationParams, on_step: StepCallback | None = None) -> GenerationOutput:
        timings: dict[str, float] = {}
        with _timed(timings, "text_encode"):
            embeds = self._encode(params)
        with _timed(timings, "denoise"):
            latents = self.denoise_all(params, embeds, on_step)
        with _timed(timings, "decode"):
            frames = to_uint8(self.decode(latents))
        return GenerationOutput(frames=frames, timings=timings)

    def decode_float(self, params: GenerationParams) -> torch.Tensor:
        """Float frames in [0, 1] before 8-bit rounding: what the oracle test compares."""
        return self.decode(self.denoise_all(params, self._encode(params), None))

    def _encode(self, params: GenerationParams) -> torch.Tensor:
        prompts = [params.prompt, params.negative_prompt] if params.uses_cfg else [params.prompt]
        return self.text_encode(prompts)

    def denoise_all(self, params: GenerationParams, embeds: torch.Tensor, on_step: StepCallback | None) -> torch.Tensor:
        sampler = make_sampler(params.sampler, self.scheduler_config, params.num_inference_steps)
        latents = initial_latents(self.spec, params, self.device)
        total = len(sampler.timesteps)
        for i, t in enumerate(sampler.timesteps):
            guidance = self._guidance_for(params, float(t))
            velocity = self.denoise.predict(latents, t, embeds, guidance)
            latents = sampler.step(velocity, latents)
            if on_step is not None:
                on_step(i + 1, total)
        return latents

    def _guidance_for(self, params: GenerationParams, t: float) -> float | None:
        """Each expert has its own scale; CFG on/off follows the high-noise scale, as in diffusers."""
        if not params.uses_cfg:
            return None
        return params.guidance_scale if self.denoise.expert_index(t) == 0 else params.guidance_scale_2


class _timed:
    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.timings[self.name] = time.perf_counter() - self.start
