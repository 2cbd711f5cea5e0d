"""Runs one checkpoint on one device, step by step: text encode -> latents -> denoise steps -> decode.

Generic over model variants: the registry (models/registry.py) names the variant's stage
assembly (e.g. models/wan/t2v.py), which owns the modules, the stages and the per-request hooks
(conditioning, the transformer's input at a step, the latents to decode). This file batches
requests through them and implements the `Runner` protocol the worker process calls.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from models.registry import resolve
from serve.engine.request import GenerationParams
from serve.loader.config import default_cfg_mode
from serve.pipeline.decode import DecodeStage, to_uint8
from serve.pipeline.denoise import DenoiseStage
from serve.pipeline.latents import initial_latents
from serve.pipeline.step_cache import StepCache
from serve.pipeline.text_encode import TextEncodeStage
from serve.sampling.flow import Sampler, sampler_for, step_all
from serve.sampling.presets import apply_preset, get_preset
from serve.vae.overlap import SideLane

StepCallback = Callable[[int, int], None]


@dataclass
class GenerationOutput:
    frames: np.ndarray  # uint8, (num_frames, height, width, 3)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    counters: dict[str, int] = field(default_factory=dict)  # e.g. step_cache_skipped / step_cache_computed


@dataclass(eq=False)
class RequestState:
    """One request inside the worker: everything that must stay on its device between steps."""

    params: GenerationParams
    embeds: torch.Tensor  # (1, L, D), or (2, L, D) with the negative prompt's row under CFG
    latents: torch.Tensor  # (1, C, F, H, W) noise latents, fp32
    sampler: Sampler
    step: int = 0
    step_cache: StepCache | None = None  # this request's first-block cache (off unless configured)
    conditioning: Any = None  # whatever the variant's `prepare` keeps besides the prompt (image latents)
    experts: tuple[int, ...] = ()  # the expert of each step, worked out once at start (`experts_of`)


class ModelStages(Protocol):
    """What a model variant assembles (models/<family>/<variant>.py)."""

    spec: Any  # the family's torch-free spec: latent shape, tokens, defaults, experts
    text_encode: TextEncodeStage
    denoise: DenoiseStage
    decode: DecodeStage
    residency: Any
    lora_log: list[str]
    scheduler_config: dict

    def prepare(self, state: RequestState) -> None: ...

    def model_input(self, state: RequestState) -> tuple[torch.Tensor, torch.Tensor]: ...

    def final_latents(self, state: RequestState) -> torch.Tensor: ...

    def warmup_params(self, height: int, width: int, num_frames: int) -> GenerationParams: ...


class ModelRunner:
    def __init__(
        self,
        model: ModelStages,
        device: torch.device,
        step_cache_threshold: float | None = None,
        prompt_cache_bytes: int | None = None,
    ) -> None:
        """`step_cache_threshold`: first-block cache threshold for every request (None: off);
        `prompt_cache_bytes`: the text encoder's embedding cache size (None: the stage's default)."""
        self.model = model
        if prompt_cache_bytes is not None:
            model.text_encode.set_cache_budget(prompt_cache_bytes)
        self.device = device
        self.spec = model.spec
        self.text_encode, self.denoise, self.decode = model.text_encode, model.denoise, model.decode
        self.step_cache_threshold = step_cache_threshold
        self.residency = model.residency
        self.lora_log = model.lora_log
        self._lane: SideLane | None = None  # made on the decode lane's first handoff

    @property
    def step_cache_threshold(self) -> float | None:
        return self._step_cache_threshold

    @step_cache_threshold.setter
    def step_cache_threshold(self, value: float | None) -> None:
        """The first-block cache's threshold (None: off), and the CFG layout that goes with it on this
        device (`default_cfg_mode`: the cache needs CFG batched), the one a server's worker gets too;
        a worker's factory may set another plan afterwards (`denoise.set_activation_plan`)."""
        self._step_cache_threshold = value
        self.denoise.set_activation_plan(default_cfg_mode(self.device.type, value is not None), 1)

    @classmethod
    def from_checkpoint(
        cls,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        quant=None,
        step_cache_threshold: float | None = None,
        prompt_cache_bytes: int | None = None,
        **options,
    ) -> ModelRunner:
        """Resolve the checkpoint's variant and load it. `quant`: per-expert quantization applied
        while loading; `options`: the variant's load options (`lora`, `vae_decode`, `residency`)."""
        entry = resolve(model_dir)
        module_name, _, class_name = entry.stages.partition(":")
        stages = getattr(importlib.import_module(module_name), class_name)
        torch_device = torch.device(device)
        model = stages.load(entry.spec, torch_device, dtype, quant, **options)
        return cls(model, torch_device, step_cache_threshold, prompt_cache_bytes)

    # ---- step-level API (the `Runner` protocol); `generate` composes the same calls ------------

    def start(self, params_list: list[GenerationParams]) -> list[RequestState]:
        """Text-encode a batch of requests in one pass, draw each one's initial latents and
        prepare its conditioning."""
        for p in params_list:
            check_resolved(p)
        prompts = [p.prompt for p in params_list]
        negatives = [p.negative_prompt for p in params_list if p.uses_cfg]
        # The residency swap wraps only the encoder passes: a batch of cached prompts moves nothing.
        encoding = self.residency.encoding if self.residency else contextlib.nullcontext
        embeds = self.text_encode(prompts + negatives, encoding).to(self.device)  # the encoder may run on the host
        states, uncond_row = [], len(prompts)
        for i, params in enumerate(params_list):
            rows = [embeds[i : i + 1]]
            if params.uses_cfg:
                rows.append(embeds[uncond_row : uncond_row + 1])
                uncond_row += 1
            sampler = sampler_for(params, self.model.scheduler_config)
            shape = self.spec.latent_shape(params.height, params.width, params.num_frames)
            state = RequestState(params, torch.cat(rows), initial_latents(shape, params.seed, self.device), sampler)
            self.model.prepare(state)
            if self.step_cache_threshold is not None:
                state.step_cache = StepCache(self.step_cache_threshold)
            state.experts = self._experts(state)
            states.append(state)
        return states

    def experts_of(self, state: RequestState) -> tuple[int, ...]:
        """Which expert runs each step: the scheduler groups batches by it."""
        return state.experts or self._experts(state)

    def _experts(self, state: RequestState) -> tuple[int, ...]:
        """Worked out from the sampler's timesteps (a tensor element read per step: done once per
        request, not every step for every request of the batch)."""
        split = get_preset(state.params.preset).boundary_step_index if state.params.preset else None
        if split is not None and len(self.denoise.experts) > 1:
            return tuple(0 if i < split else 1 for i in range(len(state.sampler.timesteps)))
        return tuple(self.denoise.expert_index(float(t)) for t in state.sampler.timesteps)

    def denoise_step(self, states: list[RequestState], expert: int) -> None:
        """One step for each request, in one forward pass. All must share shape, CFG and `expert`."""
        for s in states:
            if self.experts_of(s)[s.step] != expert:
                raise RuntimeError(f"step {s.step} of a request belongs to expert {self.experts_of(s)[s.step]}")
        cfg = states[0].params.uses_cfg
        inputs = [self.model.model_input(s) for s in states]
        hidden = torch.cat([h for h, _ in inputs])
        timesteps = torch.cat([t for _, t in inputs])
        embeds = torch.cat([s.embeds[0:1] for s in states] + ([s.embeds[1:2] for s in states] if cfg else []))
        guidance = [self._guidance_for(s.params, expert) for s in states] if cfg else None
        caches = [s.step_cache for s in states] if states[0].step_cache is not None else None
        if self.residency is not None:
            after = self.experts_of(states[0])[states[0].step + 1 :]
            self.residency.before_step(expert, after[0] if after else None, self.denoise.forwards_per_step(cfg))
        loras = [s.params.loras for s in states]
        velocity = self.denoise.predict(hidden, timesteps, embeds, guidance, expert, step_caches=caches, loras=loras)
        outputs = [velocity[i : i + 1] for i in range(len(states))]
        stepped = step_all([s.sampler for s in states], outputs, [s.latents for s in states])
        for s, latents in zip(states, stepped, strict=True):
            s.latents = latents
            s.step += 1

    def lane_handoff(self) -> contextlib.AbstractContextManager[None]:
        """For the worker's decode lane: call when handing finished requests over, enter on the lane's
        thread around their decode (on CUDA a side stream after the steps queued so far)."""
        if self._lane is None:
            self._lane = SideLane(self.device)
        return self._lane.handoff()

    def decode_chunks(self, states: list[RequestState]) -> Iterator[np.ndarray]:
        """Decode same-shaped finished requests in one VAE pass: uint8 (B, f, H, W, 3) per chunk."""
        return self.decode.iter_uint8(torch.cat([self.model.final_latents(s) for s in states]))

    def counters(self, state: RequestState) -> dict[str, int]:
        cache = state.step_cache
        return {} if cache is None else {"skipped": cache.skipped, "computed": cache.computed}

    def calibrate(self) -> list[tuple[int, int, float]]:
        """Time single denoising steps at two sizes and two batch sizes: (tokens, rows, seconds)
        samples for the scheduler's cost model. Doubles as warmup (first-call allocations)."""
        m, samples = self.spec.spatial_multiple, []
        for height, width, frames in ((2 * m, 2 * m, 5), (4 * m, 4 * m, 9)):
            params = self.model.warmup_params(height, width, frames)
            tokens = self.spec.tokens(height, width, frames)
            for batch in (1, 2):
                states = self.start([params] * batch)
                experts = self.experts_of(states[0])
                self.denoise_step(states, experts[0])  # warm this shape
                times = []
                for step in range(1, len(experts)):  # the median of three steps resists noise
                    start = time.perf_counter()
                    self.denoise_step(states, experts[step])
                    times.append(time.perf_counter() - start)
                samples.append((tokens, batch, sorted(times)[len(times) // 2]))
        return samples

    # ---- one request start to end (CLI, oracle tests) ------------------------------------------

    def generate(self, params: GenerationParams, on_step: StepCallback | None = None) -> GenerationOutput:
        timings: dict[str, float] = {}
        with _timed(timings, "text_encode"):
            (state,) = self.start([params])
        with _timed(timings, "denoise"):
            self._run_steps(state, on_step)
        with _timed(timings, "decode"):
            frames = to_uint8(self.final_frames(state))
        counters = {f"step_cache_{name}": value for name, value in self.counters(state).items()}
        return GenerationOutput(frames=frames, timings=timings, counters=counters)

    def decode_float(self, params: GenerationParams) -> torch.Tensor:
        """Float frames in [0, 1] before 8-bit rounding: what the oracle tests compare."""
        (state,) = self.start([params])
        self._run_steps(state, None)
        return self.final_frames(state)

    def final_frames(self, state: RequestState) -> torch.Tensor:
        """Float frames in [0, 1], (F, H, W, 3), of a request whose steps are done."""
        return self.decode(self.model.final_latents(state))

    def _run_steps(self, state: RequestState, on_step: StepCallback | None) -> None:
        experts = self.experts_of(state)
        while state.step < len(experts):
            self.denoise_step([state], experts[state.step])
            if on_step is not None:
                on_step(state.step, len(experts))

    def _guidance_for(self, params: GenerationParams, expert: int) -> float:
        """Each expert has its own scale; CFG on/off follows the high-noise scale, as in diffusers."""
        return params.guidance_scale if expert == 0 else params.guidance_scale_2


def check_resolved(params: GenerationParams) -> None:
    """A preset is applied once, where the request is resolved (API, CLI); the runner only checks,
    because a preset request that still carries the client's steps and guidance would run a
    different schedule than the one the scheduler planned."""
    if params.preset is not None and apply_preset(params) != params:
        raise ValueError(f"request with preset {params.preset!r} reached the runner unresolved; apply_preset first")


class _timed:
    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.timings[self.name] = time.perf_counter() - self.start
