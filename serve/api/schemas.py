"""HTTP shapes, one class per direction. Types live here; the configurable bounds do not (they come
from `ServerConfig.limits` and are checked in `params.py` at request time)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

# torch.Generator.manual_seed takes any 64-bit value; stay in the signed range so every tool can
# store it. This is a property of the seed, not a server policy, so it may live in the schema.
MAX_SEED = 2**63 - 1


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=200)
    """A LoRA file or folder name inside one of the server's LoRA directories."""
    scale: float = Field(1.0, ge=-10.0, le=10.0)


class ImageReference(BaseModel):
    """OpenAI's object form of `input_reference`. Only `image_url` as a base64 data URL is taken:
    this server fetches no URLs and stores no files (`file_id`)."""

    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    image_url: str
    """`data:image/png;base64,...` (PNG, JPEG or WebP); an http(s) URL is refused."""


class GenerateRequest(BaseModel):
    """`POST /generate`. Every field but `prompt` is optional; absent ones take the model's defaults."""

    # strict: "64" or 64.5 for a height is a client bug worth a 422, not a silent coercion.
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True, allow_inf_nan=False)

    prompt: str
    """What the video shows."""
    negative_prompt: str | None = None
    """What it should not show (used when guidance is on)."""
    height: int | None = None
    """Pixels; rounded down to the model's spatial multiple (16 for Wan)."""
    width: int | None = None
    """Pixels; rounded down to the model's spatial multiple (16 for Wan)."""
    num_frames: int | None = None
    """Frames; rounded down to the form 4k+1 that Wan's VAE needs."""
    fps: int | None = None
    """Frame rate written into the MP4."""
    num_inference_steps: int | None = None
    """Denoising steps."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale (high-noise expert); 1.0 turns guidance off."""
    guidance_scale_2: float | None = None
    """Guidance scale of the low-noise expert (two-expert models)."""
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    """Random seed; drawn at random when absent and returned in X-Reelserve-Seed."""
    sampler: Literal["unipc", "euler"] | None = None
    """Flow-matching sampler."""
    lossless: bool = False
    """Encode lossless RGB H.264 (bit-exact frames, large files) instead of playable yuv420p."""
    preset: str | None = None
    """A few-step schedule for distilled models (e.g. `lightning-4step`): it sets the steps, the
    timesteps and turns guidance off; `X-Reelserve-Adjusted` says what it overrode."""
    loras: list[LoraRef] | None = None
    """LoRAs from the server's `--lora-dir`, applied to this request only."""
    input_reference: str | ImageReference | None = None
    """Image-to-video: the first frame, a PNG, JPEG or WebP file as base64 (bare, or a
    `data:image/png;base64,...` URL) or a multipart file part. At most the server's
    `max_image_bytes` (20 MiB by default; as base64, 4/3 of that in characters) and
    `max_image_pixels` (4096x4096). It is centre-cropped to the video's aspect ratio and resized
    to its size; `X-Reelserve-Adjusted` says so. URLs are refused, never fetched. Only for
    models that take an image (I2V; TI2V optionally)."""

    _adjustments: tuple[str, ...] = PrivateAttr(default=())
    """What the server changed while mapping another request shape onto this one (e.g. `seconds`
    of `/v1/videos` beyond the frame limit); `params.resolve` reports them with its own."""

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    reason: str | None = None
    """Why the engine cannot serve (only when unavailable)."""


class FieldError(BaseModel):
    """One refused field of a 422 (FastAPI's item, without the echo of the input)."""

    loc: list[str | int]
    """Where: `["body", "height"]`, `["body", "loras", 0, "name"]`, `["query", "limit"]`."""
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Body of every 4xx/5xx answer outside `/v1/*` (`serve.api.errors`)."""

    detail: str | list[FieldError]
    """What went wrong, for a human; on a 422, one item per refused field."""
    type: str
    """`invalid_request` (422), `not_found`, `method_not_allowed`, `request_too_large`, `queue_full`,
    `generation_failed`, `internal_error`, `unavailable`, ..."""
    request_id: str | None = None
    """The engine's id of a request that failed while generating."""


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    """`invalid_request_error`, `rate_limit_exceeded`, `conflict`, `gone`, `server_error`, `unavailable`, ..."""
    param: str | None
    """The refused field, dotted (`loras.0.name`), when one field is to blame."""
    code: str | None
    """A machine-readable reason, e.g. `queue_full` or a 422's error type (`less_than_equal`)."""


class OpenAIError(BaseModel):
    """Body of every 4xx/5xx answer on `/v1/*`: OpenAI's error object."""

    error: OpenAIErrorDetail
