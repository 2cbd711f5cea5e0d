"""How a worker builds its runner: `WorkerArgs` (plain data, pickled into the spawned process) and
the production factory that turns the runner's sub-configs into torch objects there. Nothing here
imports torch at module level: the API process imports this module to build `WorkerArgs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from serve.engine.config import DType
from serve.jobs.artifacts import ArtifactTarget
from serve.loader.config import MemoryConfig, default_cfg_mode
from serve.lora.config import LoraConfig
from serve.pipeline.prompt_cache import TextEncodeConfig
from serve.quant.config import QuantizationConfig
from serve.sampling.config import SamplingConfig
from serve.vae.config import VaeDecodeConfig

DEFAULT_RUNNER_FACTORY = "serve.worker.factory:load_model_runner"

# `--weights-dtype` names a storage; the quantization that gives it (weight-only, upcast per layer).
WEIGHTS_DTYPE_QUANT = {"bf16": None, "fp8": "fp8-wo", "int8": "int8-wo"}


@dataclass(frozen=True)
class RunnerConfig:
    """What the factory builds a runner from: the server's sub-configs, as they are, plus the
    largest request the server accepts (from `Limits`: what the memory planner must fit)."""

    quant: QuantizationConfig = QuantizationConfig()
    lora: LoraConfig = LoraConfig()
    sampling: SamplingConfig = SamplingConfig()
    vae: VaeDecodeConfig = VaeDecodeConfig()
    memory: MemoryConfig = MemoryConfig()
    text: TextEncodeConfig = TextEncodeConfig()
    largest_request: tuple[int, int, int] = (1280, 1280, 129)
    """(height, width, frames) of the largest request the server accepts."""
    group: tuple[int, int] = (1, 1)
    """(ulysses, cfg) of the worker group the runner is a rank of: the planner counts one rank's
    share of the activations (serve/worker/group_worker.py sets it)."""

    def quant_text(self) -> str | None:
        """The quantization policy text the weights load with: `--quant`, else the one `--weights-dtype` implies."""
        return self.quant.policy or WEIGHTS_DTYPE_QUANT[self.memory.weights_dtype]


@dataclass(frozen=True)
class WorkerArgs:
    """What a worker needs to build its runner; pickled into the spawned process."""

    model_dir: str
    device: str = "cpu"
    dtype: DType = "float32"
    runner_factory: str = DEFAULT_RUNNER_FACTORY
    """`module:function` called as f(model_dir, device, dtype, options) -> runner; tests name a fake."""
    options: RunnerConfig = RunnerConfig()
    calibrate: bool = True
    """Time a few forwards after loading, for the scheduler's cost model (and as warmup)."""
    torch_threads: int = 0
    """CPU threads for torch in this worker (0: torch's default). Several CPU workers on one
    machine must split the cores, or each spawns a thread per core and they thrash."""
    outputs: tuple[tuple[str, ArtifactTarget], ...] = ()
    """The artifact stores finished MP4s are written to, by name (`EncodeUnit.outputs` picks one
    per request): the engine's `scratch` for `POST /generate`, `artifacts` for jobs."""
    log_format: str = "text"
    """`--log-format` of the server: its workers log the same way, to the same stderr."""
    log_level: str = "info"


def load_model_runner(model_dir: str, device: str, dtype: str, options: RunnerConfig = RunnerConfig()) -> Any:
    """The production factory: the real ModelRunner, torch imported only here."""
    import torch

    from models.wan.spec import read_spec
    from serve.lora.options import lora_options
    from serve.pipeline.prompt_cache import MIB
    from serve.quant.schemes import QuantPolicy
    from serve.worker.model_runner import ModelRunner

    quant_text = options.quant_text()
    quant = None
    if quant_text:
        quant = QuantPolicy.parse(quant_text, read_spec(model_dir).expert_names, options.quant.skip)
    step_cache = options.sampling.step_cache_threshold
    residency, cfg_mode, block_chunks, lane_fits = plan_memory(
        model_dir,
        device,
        options.memory,
        options.largest_request,
        step_cache is not None,
        options.group,
        decode_lane=options.vae.overlap == "auto",
    )
    runner = ModelRunner.from_checkpoint(
        model_dir,
        device=device,
        dtype=getattr(torch, dtype),
        quant=quant,
        lora=lora_options(options.lora),
        step_cache_threshold=step_cache,
        prompt_cache_bytes=int(options.text.prompt_cache_mb * MIB),
        residency=residency,
        vae_decode=options.vae,
    )
    runner.denoise.set_activation_plan(cfg_mode, block_chunks)
    runner.decode_lane_fits = lane_fits
    return runner


def _cfg_without_planner(memory: MemoryConfig, device: str, step_cache: bool, group: tuple[int, int]) -> str:
    """`--cfg-mode` where the planner does not choose it (`default_cfg_mode` for `auto`)."""
    if memory.cfg_mode != "auto":
        return memory.cfg_mode
    return default_cfg_mode(device.split(":")[0], step_cache, group)


class MemoryPlan(NamedTuple):
    residency: Any
    """None: everything stays resident."""
    cfg_mode: str
    block_chunks: int
    decode_lane_fits: bool = False
    """Asked for (`plan_memory(decode_lane=True)`): a CUDA device that keeps every weight, text encoder
    included, with room for a decode beside the largest request's step (what `--vae-overlap auto` needs)."""


def plan_memory(
    model_dir: str,
    device: str,
    memory: MemoryConfig,
    largest_request: tuple[int, int, int],
    step_cache: bool = False,
    group: tuple[int, int] = (1, 1),
    decode_lane: bool = False,
) -> MemoryPlan:
    """Residency, cfg mode and block chunks for this worker's device: forced by the flags, or chosen by
    the planner from this device's free memory (each GPU of a multi-GPU host is measured on its own).
    Residency None keeps everything resident, which is what `auto` means on a CPU: there is no
    separate device memory to save (CFG runs as `default_cfg_mode` says, blocks whole, unless forced).
    The first-block cache needs CFG batched (it decides per request from the cond and uncond rows
    together). `decode_lane`: also say whether a decode lane fits, from the same measurements (before
    loading: free device memory, weights not yet in it)."""
    from serve.loader.memory_model import model_stats
    from serve.loader.planner import choose, lane_fits, measure_budget
    from serve.loader.residency import ResidencyConfig

    if step_cache and memory.cfg_mode == "sequential":
        raise ValueError("--cfg-mode sequential does not combine with the step cache; drop one of them")
    cfg_mode = _cfg_without_planner(memory, device, step_cache, group)
    chunks = memory.block_chunks or 1
    decode_lane = decode_lane and device.startswith("cuda")
    if memory.mode == "resident" or (memory.mode == "auto" and device == "cpu"):
        fits = decode_lane and lane_fits(
            model_stats(model_dir),
            measure_budget(memory.vram, memory.ram, device=device),
            largest_request,
            memory.weights_dtype,
            (cfg_mode, chunks),
            group,
        )
        return MemoryPlan(None, cfg_mode, chunks, fits)
    if memory.mode != "auto":
        text = "device" if memory.text_encoder_device == "auto" else memory.text_encoder_device
        return MemoryPlan(ResidencyConfig(memory.mode, memory.prefetch_blocks, text), cfg_mode, chunks)
    budget, stats = measure_budget(memory.vram, memory.ram, device=device), model_stats(model_dir)
    plan = choose(
        stats,
        budget,
        largest_request,
        memory.weights_dtype,
        memory.prefetch_blocks,
        "auto",
        memory.text_encoder_device,
        "batched" if step_cache else memory.cfg_mode,
        memory.block_chunks,
        group,
    )
    activations = (plan.cfg_mode, plan.block_chunks)
    fits = (
        decode_lane
        and (plan.mode, plan.text_encoder) == ("resident", "device")
        and lane_fits(stats, budget, largest_request, memory.weights_dtype, activations, group)
    )
    return MemoryPlan(plan.config(memory.prefetch_blocks), plan.cfg_mode, plan.block_chunks, fits)
