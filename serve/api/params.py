"""Turn a `GenerateRequest` into `GenerationParams`: fill model defaults, enforce the configured
limits (422 naming field and bound), round sizes the model cannot take and say so, and fit an
`input_reference` image to the final size."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from fastapi.exceptions import RequestValidationError

from models.wan.spec import WanSpec
from serve.api.images import FIELD as IMAGE_FIELD
from serve.api.images import ImageInputError, condition_image, reference_bytes
from serve.api.schemas import GenerateRequest
from serve.config import Limits
from serve.engine.request import GenerationParams
from serve.lora.paths import LoraPathError, named_lora_files
from serve.sampling.presets import PRESETS, apply_preset

# field -> (lower bound, upper bound); a str names a `Limits` attribute, a number is fixed.
BOUNDS: dict[str, tuple[str | float, str | float]] = {
    "height": ("min_height", "max_height"),
    "width": ("min_width", "max_width"),
    "num_frames": ("min_num_frames", "max_num_frames"),
    "fps": ("min_fps", "max_fps"),
    "num_inference_steps": (1, "max_num_inference_steps"),
    "guidance_scale": (0.0, "max_guidance_scale"),
    "guidance_scale_2": (0.0, "max_guidance_scale"),
}
TEXT_FIELDS = ("prompt", "negative_prompt")


@dataclass(frozen=True)
class ResolvedRequest:
    params: GenerationParams
    adjustments: tuple[str, ...]
    """Human-readable roundings, e.g. "height=70->64"; sent back in X-Reelserve-Adjusted."""


def resolve(
    body: GenerateRequest,
    spec: WanSpec,
    limits: Limits,
    default_preset: str | None = None,
    lora_dirs: tuple[Path, ...] = (),
    image: bytes | None = None,
) -> ResolvedRequest:
    """`image`: an `input_reference` uploaded as a file (multipart); otherwise it is read from
    `body.input_reference` (base64)."""
    values = fill_defaults(body, spec)
    values["preset"] = values["preset"] or default_preset
    errors = limit_errors(values, limits, sent=body.model_fields_set) + preset_errors(values)
    errors += lora_errors(values["loras"], lora_dirs, len(spec.expert_names))
    has_image = image is not None or body.input_reference is not None
    errors += image_input_errors(has_image, spec)
    if errors:
        raise RequestValidationError(errors)
    adjustments = [*body._adjustments, *round_to_model(values, spec)]
    if has_image:  # after rounding: the image is fitted to the size the model will generate
        try:
            data = image if image is not None else reference_bytes(_base64_of(body.input_reference), limits)
            values["image"], adjusted = condition_image(data, values["height"], values["width"], limits)
        except ImageInputError as e:
            raise e.error() from None
        adjustments += [adjusted] if adjusted else []
    params = GenerationParams(**values)
    resolved = apply_preset(params)
    adjustments += [
        f"{name}={getattr(params, name)}->{getattr(resolved, name)} (preset {params.preset})"
        for name in ("num_inference_steps", "sampler", "guidance_scale", "guidance_scale_2")
        if getattr(params, name) != getattr(resolved, name)
    ]
    return ResolvedRequest(resolved, tuple(adjustments))


def fill_defaults(body: GenerateRequest, spec: WanSpec) -> dict:
    defaults = spec.defaults
    values = {
        name: getattr(body, name) if getattr(body, name) is not None else defaults[name]
        for name in ("height", "width", "num_frames", "fps", "num_inference_steps", "guidance_scale")
    }
    # One expert: the second scale has nothing to steer, so mirror the first (what diffusers does).
    second_default = defaults["guidance_scale_2"] if len(spec.expert_names) > 1 else values["guidance_scale"]
    values["guidance_scale_2"] = body.guidance_scale_2 if body.guidance_scale_2 is not None else second_default
    values["prompt"] = body.prompt
    values["negative_prompt"] = body.negative_prompt if body.negative_prompt is not None else ""
    values["sampler"] = body.sampler or defaults.get("sampler", "unipc")
    values["seed"] = body.seed if body.seed is not None else secrets.randbits(32)
    values["lossless"] = body.lossless
    values["preset"] = body.preset
    values["loras"] = tuple((ref.name, ref.scale) for ref in body.loras or ())
    return values


def _base64_of(reference) -> str:
    return reference if isinstance(reference, str) else reference.image_url


def image_input_errors(has_image: bool, spec: WanSpec) -> list[dict]:
    """Whether this model takes a conditioning image (`WanSpec.image_input`)."""
    if has_image and spec.image_input == "none":
        msg = f"{IMAGE_FIELD} is not accepted: this model (text-to-video) takes no image"
        return [{"type": "value_error", "loc": ("body", IMAGE_FIELD), "msg": msg, "input": None}]
    if not has_image and spec.image_input == "required":
        msg = f"{IMAGE_FIELD} is required: this model (image-to-video) generates from a first-frame image"
        return [{"type": "missing", "loc": ("body", IMAGE_FIELD), "msg": msg, "input": None}]
    return []


def lora_errors(loras: tuple[tuple[str, float], ...], lora_dirs: tuple[Path, ...], experts: int) -> list[dict]:
    """A request may only name LoRAs inside the configured directories (checked on paths here;
    the worker reads and validates the file itself)."""
    errors = []
    for i, (name, _) in enumerate(loras):
        if not lora_dirs:
            msg = "this server accepts no per-request LoRAs (start it with --lora-dir DIR)"
        else:
            try:
                named_lora_files(name, lora_dirs, experts)
                continue
            except LoraPathError as e:  # its messages name the LoRA, never a host directory
                msg = str(e)
            except (ValueError, OSError):  # e.g. a name longer than the filesystem takes
                msg = f"LoRA name {name!r} is not a usable file name"
        errors.append({"type": "value_error", "loc": ("body", "loras", i, "name"), "msg": msg, "input": name})
    return errors


def preset_errors(values: dict) -> list[dict]:
    name = values["preset"]
    if name is None or name in PRESETS:
        return []
    msg = f"unknown preset {name!r}; choose one of {sorted(PRESETS)}"
    return [{"type": "value_error", "loc": ("body", "preset"), "msg": msg, "input": name}]


def limit_errors(values: dict, limits: Limits, sent: set[str]) -> list[dict]:
    """Pydantic-shaped error dicts, so FastAPI renders them exactly like schema errors."""
    errors = []
    for name, (low, high) in BOUNDS.items():
        errors += _range_error(name, values[name], low, high, limits, from_model=name not in sent)
    for name in TEXT_FIELDS:
        if len(values[name]) > limits.max_prompt_chars:
            msg = f"{name} must be at most {limits.max_prompt_chars} characters (server limit --max-prompt-chars)"
            errors.append(_error(name, "string_too_long", msg, len(values[name]), limits.max_prompt_chars))
    return errors


def _range_error(name, value, low, high, limits: Limits, from_model: bool) -> list[dict]:
    origin = " (the model's default; send a smaller value)" if from_model else ""
    high_value = getattr(limits, high) if isinstance(high, str) else high
    low_value = getattr(limits, low) if isinstance(low, str) else low
    if value > high_value:
        msg = f"{name} must be <= {high_value}{_flag(high)}{origin}"
        return [_error(name, "less_than_equal", msg, value, high_value)]
    if value < low_value:
        return [_error(name, "greater_than_equal", f"{name} must be >= {low_value}{_flag(low)}", value, low_value)]
    return []


def _flag(bound: str | float) -> str:
    return f" (server limit --{bound.replace('_', '-')})" if isinstance(bound, str) else ""


def _error(name: str, kind: str, msg: str, value, limit) -> dict:
    return {"type": kind, "loc": ("body", name), "msg": msg, "input": value, "ctx": {"limit": limit}}


def round_to_model(values: dict, spec: WanSpec) -> list[str]:
    """Round down in place to sizes the model takes (the spec knows its VAE strides and patch);
    return what changed."""
    return spec.round_size(values)
