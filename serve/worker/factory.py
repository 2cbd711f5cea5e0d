"""How a worker builds its runner: the options (plain data, pickled into the spawned process) and
the production factory that turns them into torch objects there. Nothing here imports torch at
module level: the API process imports this module to build `WorkerArgs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_RUNNER_FACTORY = "serve.worker.factory:load_model_runner"


@dataclass(frozen=True)
class RunnerOptions:
    """How the worker builds its runner, as plain data (it is pickled into the spawned process and
    built into torch objects there, so the API process never imports torch)."""

    quant: str | None = None
    """Per-expert quantization policy, e.g. `high=w8a8-int8,low=none` (None: float weights)."""
    quant_skip: tuple[str, ...] = ()
    """Extra regexes of layers to keep in float."""
    lora_dirs: tuple[str, ...] = ()
    """Directories LoRA files may come from."""
    fused_loras: tuple[tuple[str, int, float], ...] = ()
    """(file, expert index, scale) fused into the weights at load."""
    per_request_loras: bool = False
    """Whether requests may name LoRAs from `lora_dirs`."""
    step_cache_threshold: float | None = None
    """First-block step cache threshold for every request (None: off)."""
    vae_tile: int | None = None
    """VAE decode tile size in output pixels (None: untiled)."""
    vae_tile_overlap: int = 64
    vae_chunk_frames: int = 1
    """Latent frames per temporal decode chunk."""
    vae_workers: int = 1
    """Threads (or devices) that decode tiles in parallel."""
    vae_order: str = "chunk-major"
    """chunk-major streams chunks into the MP4; tile-major holds one tile's cache at a time (least memory)."""
    memory_mode: str = "auto"
    """auto (the planner picks for this worker's device), resident, expert-swap or block-offload."""
    weights_dtype: str = "bf16"
    """Weight storage the planner assumes: bf16, fp8 or int8 (fp8/int8 imply weight-only quantization)."""
    text_encoder_device: str = "auto"
    prefetch_blocks: int = 1
    vram: str | None = None
    """Device budget, e.g. 24GiB (None: measured free memory of this worker's device)."""
    ram: str | None = None
    largest_request: tuple[int, int, int] = (1280, 1280, 129)
    """(height, width, frames) of the largest request the server accepts: what must fit."""


@dataclass(frozen=True)
class WorkerArgs:
    """What a worker needs to build its runner; pickled into the spawned process."""

    model_dir: str
    device: str = "cpu"
    dtype: str = "float32"
    runner_factory: str = DEFAULT_RUNNER_FACTORY
    """`module:function` called as f(model_dir, device, dtype, options) -> runner; tests name a fake."""
    options: RunnerOptions = RunnerOptions()
    calibrate: bool = True
    """Time a few forwards after loading, for the scheduler's cost model (and as warmup)."""
    torch_threads: int = 0
    """CPU threads for torch in this worker (0: torch's default). Several CPU workers on one
    machine must split the cores, or each spawns a thread per core and they thrash."""


def load_model_runner(model_dir: str, device: str, dtype: str, options: RunnerOptions = RunnerOptions()) -> Any:
    """The production factory: the real ModelRunner, torch imported only here."""
    import torch

    from models.wan.spec import read_spec
    from serve.lora.options import FusedLora, LoraOptions
    from serve.quant.schemes import QuantPolicy
    from serve.vae import VaeDecodeConfig
    from serve.worker.model_runner import ModelRunner

    quant_text = options.quant or WEIGHTS_DTYPE_QUANT[options.weights_dtype]
    quant = None
    if quant_text:
        quant = QuantPolicy.parse(quant_text, read_spec(model_dir).expert_names, options.quant_skip)
    fused_dirs = tuple(dict.fromkeys(Path(f).resolve().parent for f, _, _ in options.fused_loras))
    lora = LoraOptions(
        # The operator's own command line is trusted: files fused at load may sit outside
        # --lora-dir; per-request LoRAs never do (per_request is set only with --lora-dir).
        lora_dirs=tuple(Path(d) for d in options.lora_dirs) or fused_dirs,
        fused=tuple(FusedLora(Path(f), expert, scale) for f, expert, scale in options.fused_loras),
        per_request=options.per_request_loras,
    )
    return ModelRunner.from_checkpoint(
        model_dir,
        device=device,
        dtype=getattr(torch, dtype),
        quant=quant,
        lora=lora,
        step_cache_threshold=options.step_cache_threshold,
        residency=plan_residency(model_dir, device, options),
        vae_decode=VaeDecodeConfig(
            tile_sample_size=options.vae_tile,
            tile_sample_overlap=options.vae_tile_overlap,
            chunk_latent_frames=options.vae_chunk_frames,
            workers=options.vae_workers,
            order=options.vae_order,
        ),
    )


# `--weights-dtype` names a storage; the quantization that gives it (weight-only, upcast per layer).
WEIGHTS_DTYPE_QUANT = {"bf16": None, "fp8": "fp8-wo", "int8": "int8-wo"}


def plan_residency(model_dir: str, device: str, options: RunnerOptions) -> Any:
    """The memory mode for this worker's device: forced by `memory_mode`, or chosen by the planner
    from this device's free memory (each GPU of a multi-GPU host is measured on its own).
    None keeps everything resident, which is what `auto` means on a CPU: there is no separate
    device memory to save."""
    from models.inspect import model_stats
    from serve.loader.planner import choose, measure_budget
    from serve.loader.residency import ResidencyConfig

    if options.memory_mode == "resident" or (options.memory_mode == "auto" and device == "cpu"):
        return None
    if options.memory_mode != "auto":
        text = "device" if options.text_encoder_device == "auto" else options.text_encoder_device
        return ResidencyConfig(options.memory_mode, options.prefetch_blocks, text)
    budget = measure_budget(options.vram, options.ram, device=device)
    plan = choose(
        model_stats(model_dir),
        budget,
        options.largest_request,
        options.weights_dtype,
        options.prefetch_blocks,
        "auto",
        options.text_encoder_device,
    )
    return plan.config(options.prefetch_blocks)
