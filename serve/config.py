"""The config tree: typed, frozen, validated once at startup; errors name the bad value and the fix.

`ServerConfig` holds the API process's own settings (listen address, job store, `Limits`) and nests
one torch-free sub-config per package, each declared once in its package and handed on as is:

    workers    serve/engine/config.py    WorkersConfig       devices, worker count, dtype
    scheduler  serve/engine/config.py    SchedulerConfig     queue, batching, expert order, deadlines
    quant      serve/quant/config.py     QuantizationConfig  per-expert weight quantization
    lora       serve/lora/config.py      LoraConfig          LoRA directories and LoRAs fused at load
    sampling   serve/sampling/config.py  SamplingConfig      default preset, step cache
    vae        serve/vae/config.py       VaeDecodeConfig     tiled, chunked, parallel decode
    text       serve/pipeline/prompt_cache.py  TextEncodeConfig  the prompt-embedding cache
    memory     serve/loader/config.py    MemoryConfig        memory mode, weight storage, budgets
    jobs       serve/jobs/config.py      JobsConfig          job store, artifact store, claims
    access     serve/api/config.py       AccessConfig        API keys, connection timeouts

The command line is generated from these fields (serve/cli_flags.py): a field's flag, help, type,
choices and default all come from here. Every bound a request is checked against lives in
`Limits`, so the API enforces what the operator configured (`reelserve serve --max-height ...`)
rather than numbers baked into schemas. Checks that span sub-configs live on `ServerConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from serve.api.config import AccessConfig
from serve.engine.config import SchedulerConfig, WorkersConfig
from serve.frozen import FrozenConfig, flag
from serve.jobs.config import JobsConfig
from serve.loader.config import MemoryConfig
from serve.lora.config import LoraConfig
from serve.pipeline.prompt_cache import TextEncodeConfig
from serve.quant.config import QuantizationConfig
from serve.sampling.config import SamplingConfig
from serve.vae.config import VaeDecodeConfig


class Limits(FrozenConfig):
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


class ServerConfig(FrozenConfig):
    """Everything `reelserve serve` needs; built once from the CLI flags."""

    model_dir: Path = Field(json_schema_extra=flag("--model"))
    """A Wan checkpoint in the diffusers layout: the directory holding model_index.json, or a
    Hugging Face id (`Wan-AI/Wan2.2-T2V-A14B-Diffusers`) already in the local Hugging Face cache
    (read offline; nothing is downloaded)."""
    served_model_name: tuple[str, ...] = ()
    """Names the API serves the model under (repeat for aliases); the first is the one jobs report
    as their `model`. Default: the Hugging Face id, or the checkpoint folder's name."""
    host: str = "127.0.0.1"
    """Interface to listen on; use 0.0.0.0 to accept connections from other hosts."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port to listen on; 0 picks a free one."""
    output_dir: Path | None = None
    """Where the embedded job store (`jobs.sqlite3`) and job MP4s are kept (`--output-dir`); give one
    to keep jobs across restarts. Default: a fresh directory under the system temp dir."""
    max_stored_videos: int = Field(100, ge=1)
    """Finished jobs kept (records and videos together); the oldest are deleted beyond this."""
    video_ttl_s: float = Field(3600.0, gt=0)
    """Seconds a finished job stays listed and its video downloadable (`expires_at`); then both go."""
    shutdown_timeout_s: float = Field(300.0, ge=0)
    """On SIGTERM, how long running work may take to finish (new work gets 503 meanwhile); what is
    left then stays queued in the job store for the next start or another replica."""
    log_format: Literal["text", "json"] = "text"
    """`json`: one object per line (ts, level, logger, message, request_id when known), for log
    collectors; `text`: one readable line per event."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """The least severe log events written (the server's, the engine's, the workers' and uvicorn's)."""
    jobs: JobsConfig = JobsConfig()
    """Job store, artifact store and claims."""
    access: AccessConfig = AccessConfig()
    """API keys and connection timeouts."""
    limits: Limits = Limits()
    """Per-request bounds enforced by the API."""
    workers: WorkersConfig = WorkersConfig()
    """The worker processes: devices, count, dtype."""
    scheduler: SchedulerConfig = SchedulerConfig()
    """Queue, batching and expert-order policy of the engine."""
    quant: QuantizationConfig = QuantizationConfig()
    """Weight quantization applied while loading."""
    lora: LoraConfig = LoraConfig()
    """LoRA directories and LoRAs fused at load."""
    sampling: SamplingConfig = SamplingConfig()
    """Default preset and step cache of every request."""
    vae: VaeDecodeConfig = VaeDecodeConfig()
    """VAE decode tiling, chunking and parallelism."""
    text: TextEncodeConfig = TextEncodeConfig()
    """Text encoding: the prompt-embedding cache of each worker."""
    memory: MemoryConfig = MemoryConfig()
    """Memory mode, weight storage and the planner's budgets."""

    @field_validator("model_dir", mode="before")
    @classmethod
    def _from_hf_cache(cls, value: object) -> object:
        """A Hugging Face id becomes its snapshot in the local cache (serve/model_source.py)."""
        from serve.model_source import model_directory

        return model_directory(value) if isinstance(value, str | Path) else value

    @field_validator("model_dir")
    @classmethod
    def _is_checkpoint(cls, value: Path) -> Path:
        if not (value / "model_index.json").is_file():
            raise ValueError(
                f"{value} has no model_index.json; pass the diffusers-layout checkpoint root "
                "(the directory with model_index.json, transformer/, vae/, text_encoder/)"
            )
        return value.resolve()

    @field_validator("served_model_name")
    @classmethod
    def _names_are_usable(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if not name.strip() or name != name.strip():
                raise ValueError(f"served model name {name!r} is empty or has surrounding spaces; give a plain name")
        if len(set(names)) != len(names):
            raise ValueError(f"served model names {list(names)} repeat a name; give each once")
        return names

    @property
    def model_names(self) -> tuple[str, ...]:
        """The names the API answers to; the first is the one reported."""
        from serve.model_source import served_name

        return self.served_model_name or (served_name(self.model_dir),)

    @model_validator(mode="after")
    def _groups_run_without_the_step_cache(self) -> ServerConfig:
        """Each rank of a group would judge "skip this block" from its own slice of the sequence,
        and ranks that disagree wait on each other forever."""
        if self.workers.degrees() != (1, 1) and self.sampling.step_cache_threshold is not None:
            raise ValueError("--step-cache-threshold does not combine with --parallel; drop one of them")
        return self

    @model_validator(mode="after")
    def _groups_decode_on_the_main_lane(self) -> ServerConfig:
        """A group's ranks decode their VAE tiles together, in collectives that must stay in step with
        the steps' collectives: a second lane would interleave the two."""
        if self.workers.degrees() != (1, 1) and self.vae.overlap == "on":
            raise ValueError("--vae-overlap on does not combine with --parallel; drop one of them")
        return self

    @model_validator(mode="after")
    def _one_weight_storage(self) -> ServerConfig:
        if self.quant.policy is not None and self.memory.weights_dtype != "bf16":
            raise ValueError("give --quant or --weights-dtype, not both (--quant sets the weight storage itself)")
        return self

    @model_validator(mode="after")
    def _quant_names_real_experts(self) -> ServerConfig:
        """A bad `--quant` fails here, before any worker loads (the schemes hold torch dtypes, so
        torch is imported only when a policy is given)."""
        if self.quant.policy is not None:
            from models.wan.spec import read_spec
            from serve.quant.schemes import QuantPolicy

            QuantPolicy.parse(self.quant.policy, read_spec(self.model_dir).expert_names, self.quant.skip)
        return self
