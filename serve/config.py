"""Typed, frozen server configuration, validated once at startup.

Every bound a request is checked against lives in `Limits`, so the API enforces what the
operator configured (`reelserve serve --max-height ...`) rather than numbers baked into schemas.
Errors name the bad value and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DType = Literal["float32", "bfloat16", "float16"]


class _Frozen(BaseModel):
    # Attribute docstrings become field descriptions (shown in `--help` and the OpenAPI schema).
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class Limits(_Frozen):
    """Per-request bounds. A request outside them is refused with HTTP 422 naming the bound."""

    min_height: int = Field(16, ge=1)
    """Smallest accepted height in pixels (before rounding to the model's spatial multiple)."""
    max_height: int = Field(1280, ge=1)
    """Largest accepted height in pixels (`--max-height`)."""
    min_width: int = Field(16, ge=1)
    """Smallest accepted width in pixels (before rounding to the model's spatial multiple)."""
    max_width: int = Field(1280, ge=1)
    """Largest accepted width in pixels (`--max-width`)."""
    min_num_frames: int = Field(1, ge=1)
    """Fewest frames per video; 1 gives a single image."""
    max_num_frames: int = Field(129, ge=1)
    """Most frames per video (`--max-num-frames`); must be of the form 4k+1, as Wan's VAE needs."""
    max_num_inference_steps: int = Field(100, ge=1)
    """Most denoising steps per request (`--max-num-inference-steps`)."""
    max_prompt_chars: int = Field(2000, ge=1)
    """Longest prompt or negative prompt, in characters (`--max-prompt-chars`)."""
    min_fps: int = Field(1, ge=1)
    """Lowest frame rate written into the MP4."""
    max_fps: int = Field(60, ge=1)
    """Highest frame rate written into the MP4 (`--max-fps`)."""
    max_guidance_scale: float = Field(20.0, ge=0.0)
    """Largest classifier-free guidance scale; larger values only saturate the video."""
    max_image_bytes: int = Field(20 << 20, ge=1)
    """Largest conditioning image (`input_reference`) file, in bytes; the body limit of the routes
    that take one grows to fit it as base64."""
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    """Most pixels (width x height) of a conditioning image, checked from its header before decoding."""

    @field_validator("max_num_frames")
    @classmethod
    def _frames_are_4k_plus_1(cls, value: int) -> int:
        if (value - 1) % 4:
            fix = (value - 1) // 4 * 4 + 1
            raise ValueError(f"max_num_frames={value} is not of the form 4k+1; use {fix}")
        return value

    @model_validator(mode="after")
    def _min_not_above_max(self) -> Limits:
        for name in ("height", "width", "num_frames", "fps"):
            low, high = getattr(self, f"min_{name}"), getattr(self, f"max_{name}")
            if low > high:
                raise ValueError(f"min_{name}={low} is above max_{name}={high}; lower min_{name}")
        return self


class ServerConfig(_Frozen):
    """Everything `reelserve serve` needs; built once from the CLI flags."""

    model_dir: Path
    """A Wan checkpoint in the diffusers layout (the directory holding model_index.json)."""
    host: str = "127.0.0.1"
    """Interface to listen on; use 0.0.0.0 to accept connections from other hosts."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port to listen on; 0 picks a free one."""
    device: str = "cpu"
    """Torch device the worker runs the model on, e.g. `cpu` or `cuda:0`."""
    dtype: DType = "float32"
    """Weight and activation dtype of the model in the worker."""
    limits: Limits = Limits()
    """Per-request bounds enforced by the API."""
    devices: tuple[str, ...] = ()
    """One worker process per device (`--devices cuda:0,cuda:1`); empty: `workers` on `device`."""
    workers: int = Field(1, ge=1, le=64)
    """Worker processes on `device` when `devices` is empty (`--workers N`, for CPU machines)."""
    max_queue: int = Field(16, ge=1)
    """Requests that may wait for a worker; one more gets HTTP 429 with Retry-After."""
    max_batch_size: int = Field(8, ge=1, le=256)
    """Most requests sharing one denoising step (`--max-batch-size`)."""
    max_batch_cost_s: float | None = Field(None, gt=0)
    """Most predicted seconds of one batched step; none by default (`--max-batch-cost-s`)."""
    max_running_per_worker: int = Field(8, ge=1)
    """Requests whose latents one worker holds at once."""
    expert_policy: Literal["fcfs", "min-swap"] = "min-swap"
    """Order of denoising batches across MoE experts (`min-swap` groups work by expert)."""
    request_timeout_s: float = Field(3600.0, gt=0)
    """A request not finished this long after arrival fails with a reason (`--request-timeout-s`)."""
    output_dir: Path | None = None
    """Where job MP4s are kept; default a fresh directory under the system temp dir."""
    max_stored_videos: int = Field(100, ge=1)
    """Finished job videos kept; the oldest are deleted beyond this."""
    video_ttl_s: float = Field(3600.0, gt=0)
    """Seconds a finished job's video stays downloadable (`expires_at`)."""
    quant: str | None = None
    """Per-expert weight quantization applied while loading (`--quant high=w8a8-int8,low=none`)."""
    quant_skip: tuple[str, ...] = ()
    """Regexes of extra layers kept in float (`--quant-skip`)."""
    lora_dirs: tuple[Path, ...] = ()
    """Directories LoRA files may come from (`--lora-dir`); requests may name LoRAs inside them."""
    fused_loras: tuple[tuple[Path, int, float], ...] = ()
    """(file, expert 0 high / 1 low, scale) fused at load (`--lora-high FILE --lora-high-scale S`)."""
    step_cache_threshold: float | None = Field(None, ge=0)
    """First-block step cache threshold (`--step-cache-threshold`); off by default."""
    vae_tile: int | None = Field(None, ge=16)
    """VAE decode tile size in output pixels (`--vae-tile`); None decodes untiled."""
    vae_tile_overlap: int = Field(64, ge=0)
    """Pixels adjacent tiles share and blend (`--vae-tile-overlap`)."""
    vae_chunk_frames: int = Field(1, ge=1)
    """Latent frames per temporal decode chunk (`--vae-chunk-frames`); each chunk streams to the MP4."""
    vae_workers: int = Field(1, ge=1)
    """Threads decoding tiles in parallel (`--vae-workers`)."""
    vae_order: Literal["chunk-major", "tile-major"] = "chunk-major"
    """`chunk-major` streams each decoded chunk into the MP4; `tile-major` decodes one tile over all
    frames at a time, holding one tile's causal cache (0.30x the untiled peak at 256px/128px tiles),
    and the MP4 only starts when decoding ends (`--vae-order`)."""
    memory_mode: Literal["auto", "resident", "expert-swap", "block-offload"] = "auto"
    """Where weights live (`--memory-mode`): `auto` lets each worker's planner pick from its device's
    free memory and the largest request the limits allow; on a CPU, auto is resident."""
    weights_dtype: Literal["bf16", "fp8", "int8"] = "bf16"
    """Weight storage (`--weights-dtype`); fp8/int8 quantize weight-only while loading (use `--quant`
    for W8A8 or per-expert choices)."""
    text_encoder_device: Literal["auto", "device", "swap", "cpu"] = "auto"
    """Text encoder placement (`--text-encoder-device`): on the device, swapped in to encode, or on the CPU."""
    prefetch_blocks: int = Field(1, ge=0)
    """Blocks loaded ahead under block-offload (`--prefetch-blocks`)."""
    vram: str | None = None
    """Device memory budget for the planner, e.g. `24GiB` (`--vram`); default: measured free memory."""
    ram: str | None = None
    """Host memory budget for the planner, e.g. `64GiB` (`--ram`); default: measured available memory."""
    default_preset: str | None = None
    """Few-step preset for requests that name none (`--preset`), for a server of a distilled model."""
    worker_start_timeout_s: float = Field(600.0, gt=0)
    """How long the worker may take to load the model before startup fails."""

    @field_validator("model_dir")
    @classmethod
    def _is_checkpoint(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"model directory {value} does not exist; pass --model DIR of a Wan checkpoint")
        if not (value / "model_index.json").is_file():
            raise ValueError(
                f"{value} has no model_index.json; pass the diffusers-layout checkpoint root "
                "(the directory with model_index.json, transformer/, vae/, text_encoder/)"
            )
        return value.resolve()

    def worker_devices(self) -> list[str]:
        return list(self.devices) or [self.device] * self.workers

    @model_validator(mode="after")
    def _one_weight_storage(self) -> ServerConfig:
        if self.quant is not None and self.weights_dtype != "bf16":
            raise ValueError("give --quant or --weights-dtype, not both (--quant sets the weight storage itself)")
        return self

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        kind = value.split(":", 1)[0]
        if kind not in ("cpu", "cuda", "mps", "xpu"):
            raise ValueError(f"device {value!r} is not a torch device; use cpu, cuda or cuda:N")
        return value
