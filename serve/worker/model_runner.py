"""Runs one Wan checkpoint on one device: text encode -> latents -> denoise steps -> VAE decode.

The runner owns the modules; the stages in serve/pipeline/ do the work. Loading goes through
the streaming loader (serve/loader), so no component is ever materialised twice.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.wan.spec import WanSpec, read_spec
from serve.engine.request import GenerationParams
from serve.loader.residency import ResidencyConfig, ResidencyManager
from serve.lora.options import LoraOptions, fuse_configured
from serve.lora.runtime import LoraRegistry
from serve.pipeline.decode import DecodeStage, stream_decode_to_mp4s, to_uint8
from serve.pipeline.denoise import DenoiseStage
from serve.pipeline.latents import initial_latents
from serve.pipeline.step_cache import StepCache
from serve.pipeline.text_encode import TextEncodeStage
from serve.quant.schemes import QuantPolicy
from serve.sampling.flow import Sampler, sampler_for
from serve.sampling.presets import apply_preset, get_preset
from serve.vae import VaeDecodeConfig

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
    latents: torch.Tensor  # (1, C, F, H, W), fp32
    sampler: Sampler
    step: int = 0
    step_cache: StepCache | None = None  # this request's first-block cache (off unless configured)


@dataclass
class WanComponents:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    experts: list[torch.nn.Module]  # [transformer] or [transformer, transformer_2]
    scheduler_config: dict


def load_components(
    spec: WanSpec,
    device: torch.device,
    dtype: torch.dtype,
    quant: QuantPolicy | None = None,
    residency: ResidencyConfig | None = None,
) -> WanComponents:
    from transformers import AutoTokenizer

    from serve.loader import load_component

    root = spec.model_dir
    # Offloaded components load on the host: the residency manager moves what the device may hold.
    host = torch.device("cpu")
    expert_device = device if residency is None or residency.mode == "resident" else host
    text_device = device if residency is None or residency.text_encoder == "device" else host
    return WanComponents(
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder=load_component(root / "text_encoder", text_device, dtype),
        # The VAE stays fp32: diffusers' Wan docs recommend it, bf16 decode visibly degrades frames.
        vae=load_component(root / "vae", device, torch.float32),
        # Quantization is per expert (`--quant high=w8a8-int8,low=none`): each expert is quantized
        # while it streams in, so its float weights never sit on the device.
        experts=[
            load_component(root / name, expert_device, dtype, quant=quant.for_expert(name) if quant else None)
            for name in spec.expert_names
        ],
        scheduler_config=json.loads((root / "scheduler" / "scheduler_config.json").read_text()),
    )


class ModelRunner:
    def __init__(
        self,
        spec: WanSpec,
        components: WanComponents,
        device: torch.device,
        lora: LoraOptions | None = None,
        step_cache_threshold: float | None = None,
        vae_decode: VaeDecodeConfig | None = None,
        residency: ResidencyConfig | None = None,
    ) -> None:
        """`lora`: LoRAs fused at load and the directories per-request LoRAs come from.
        `step_cache_threshold`: first-block cache threshold for every request (None: off).
        `vae_decode`: temporal chunks, spatial tiles and decode workers (default: untiled).
        `residency`: memory mode (serve/loader/residency.py); None keeps everything where it was loaded."""
        lora = lora or LoraOptions()
        self.lora_log = fuse_configured(components.experts, lora)
        self.step_cache_threshold = step_cache_threshold
        self.spec = spec
        self.device = device
        self.scheduler_config = components.scheduler_config
        self.text_encode = TextEncodeStage(components.tokenizer, components.text_encoder)
        self.denoise = DenoiseStage(components.experts, spec.boundary_timestep())
        if lora.lora_dirs and lora.per_request:
            self.denoise.lora_registry = LoraRegistry(lora.lora_dirs, components.experts)
        self.decode = DecodeStage(components.vae, vae_decode)
        self.residency = None if residency is None else install_residency(residency, spec, components, device)

    @classmethod
    def from_checkpoint(
        cls,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        quant: QuantPolicy | None = None,
        **options,
    ) -> ModelRunner:
        """`quant`: per-expert quantization applied while loading. `options`: the constructor's
        keyword options (`lora`, `step_cache_threshold`)."""
        spec = read_spec(model_dir)
        if quant is not None:
            quant.check_no_fused_lora(spec.expert_names, options.get("lora"))
        torch_device = torch.device(device)
        components = load_components(spec, torch_device, dtype, quant, options.get("residency"))
        return cls(spec, components, torch_device, **options)

    # ---- step-level API: what the worker process calls; `generate` composes the same calls ----

    def start(self, params_list: list[GenerationParams]) -> list[RequestState]:
        """Text-encode a batch of requests in one pass and draw each one's initial latents."""
        params_list = [apply_preset(p) for p in params_list]  # a preset fixes steps and turns CFG off
        prompts = [p.prompt for p in params_list]
        negatives = [p.negative_prompt for p in params_list if p.uses_cfg]
        with self.residency.encoding() if self.residency else contextlib.nullcontext():
            embeds = self.text_encode(prompts + negatives).to(self.device)  # the encoder may run on the host
        states, uncond_row = [], len(prompts)
        for i, params in enumerate(params_list):
            rows = [embeds[i : i + 1]]
            if params.uses_cfg:
                rows.append(embeds[uncond_row : uncond_row + 1])
                uncond_row += 1
            sampler = sampler_for(params, self.scheduler_config)
            latents = initial_latents(self.spec, params, self.device)
            state = RequestState(params, torch.cat(rows), latents, sampler)
            if self.step_cache_threshold is not None:
                state.step_cache = StepCache(self.step_cache_threshold)
            states.append(state)
        return states

    def experts_of(self, state: RequestState) -> tuple[int, ...]:
        """Which expert runs each step: the scheduler groups batches by it."""
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
        latents = torch.cat([s.latents for s in states])
        timesteps = torch.stack([s.sampler.timesteps[s.step] for s in states])
        embeds = torch.cat([s.embeds[0:1] for s in states] + ([s.embeds[1:2] for s in states] if cfg else []))
        guidance = [self._guidance_for(s.params, expert) for s in states] if cfg else None
        caches = [s.step_cache for s in states] if states[0].step_cache is not None else None
        if self.residency is not None:
            after = self.experts_of(states[0])[states[0].step + 1 :]
            self.residency.before_step(expert, after[0] if after else None)
        loras = [s.params.loras for s in states]
        velocity = self.denoise.predict(latents, timesteps, embeds, guidance, expert, step_caches=caches, loras=loras)
        for i, s in enumerate(states):
            s.latents = s.sampler.step(velocity[i : i + 1], s.latents)
            s.step += 1

    def finish(self, state: RequestState) -> np.ndarray:
        """Decode a request whose steps are done to uint8 frames (F, H, W, 3)."""
        return to_uint8(self.decode(state.latents))

    def finish_mp4(self, states: list[RequestState]) -> tuple[list[bytes], dict[str, float]]:
        """Decode same-shaped finished requests in one VAE pass, streaming each into its MP4 chunk
        by chunk (no video is ever held whole); returns the MP4s and decode/mp4 seconds."""
        sinks = [io.BytesIO() for _ in states]
        timings = stream_decode_to_mp4s(
            self.decode,
            torch.cat([s.latents for s in states]),
            sinks,
            [s.params.fps for s in states],
            [s.params.lossless for s in states],
        )
        return [sink.getvalue() for sink in sinks], timings

    def calibrate(self) -> list[tuple[int, int, float]]:
        """Time single denoising steps at two sizes and two batch sizes: (tokens, rows, seconds)
        samples for the scheduler's cost model. Doubles as warmup (first-call allocations)."""
        m, samples = self.spec.spatial_multiple, []
        for height, width, frames in ((2 * m, 2 * m, 5), (4 * m, 4 * m, 9)):
            params = GenerationParams("calibration", "", height, width, frames, 16, 4, 1.0, 1.0, seed=0)
            tokens = ((frames - 1) // self.spec.vae_scale_temporal + 1) * (height // m) * (width // m)
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
            frames = self.finish(state)
        counters = {}
        if state.step_cache is not None:
            counters = {
                "step_cache_skipped": state.step_cache.skipped,
                "step_cache_computed": state.step_cache.computed,
            }
        return GenerationOutput(frames=frames, timings=timings, counters=counters)

    def decode_float(self, params: GenerationParams) -> torch.Tensor:
        """Float frames in [0, 1] before 8-bit rounding: what the oracle test compares."""
        (state,) = self.start([params])
        self._run_steps(state, None)
        return self.decode(state.latents)

    def _run_steps(self, state: RequestState, on_step: StepCallback | None) -> None:
        experts = self.experts_of(state)
        while state.step < len(experts):
            self.denoise_step([state], experts[state.step])
            if on_step is not None:
                on_step(state.step, len(experts))

    def _guidance_for(self, params: GenerationParams, expert: int) -> float:
        """Each expert has its own scale; CFG on/off follows the high-noise scale, as in diffusers."""
        return params.guidance_scale if expert == 0 else params.guidance_scale_2


def install_residency(
    config: ResidencyConfig, spec: WanSpec, components: WanComponents, device: torch.device
) -> ResidencyManager:
    """A manager holding the runner's experts, text encoder and VAE per `config`."""
    manager = ResidencyManager(config, device)
    manager.add_fixed("vae", components.vae)
    manager.add_text_encoder(components.text_encoder)
    for name, module in zip(spec.expert_names, components.experts, strict=True):
        manager.add_expert(name, module, spec.model_dir / name)
    return manager


class _timed:
    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.timings[self.name] = time.perf_counter() - self.start
