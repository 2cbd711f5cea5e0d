"""The request contract as the OpenAPI document states it: the bounds this server enforces (its
configured `Limits`, the served model, its presets and LoRA directories) written into the request
schemas, so a body the schema calls valid is accepted and one it calls invalid is a 422.

The few rules a JSON Schema keyword cannot state directly (a `size` within the width and height
limits, a `seconds` string within its range) are regular expressions built here, and the server
checks those fields with the very same expressions (`size_pattern`, `seconds_pattern`).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

from models.wan.spec import WanSpec
from serve.api.images import FIELD as IMAGE_FIELD
from serve.api.params import BOUNDS  # the same bounds the server enforces
from serve.config import Limits
from serve.sampling.presets import PRESETS

# Every character Python's str.isspace() (and so str.strip()) takes as whitespace: the prompt
# must hold one that is not, and the regex engines that read the schema disagree on `\s`.
WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# No text field takes a NUL (`parse_body` refuses it); the prompt also needs a non-blank character.
NO_NUL = "^[^\\x00]*$"
NOT_BLANK = f"^[^\\x00]*[^\\x00{WHITESPACE}][^\\x00]*$"


def int_range_pattern(low: int, high: int) -> str:
    """A regex (unanchored group) matching the decimal integers low..high, without leading zeros."""
    if low > high:
        return "(?!)"
    parts = []
    for digits in range(len(str(low)), len(str(high)) + 1):
        lo, hi = max(low, 10 ** (digits - 1) if digits > 1 else 0), min(high, 10**digits - 1)
        if lo <= hi:
            parts += _same_length(str(lo), str(hi))
    return "(?:" + "|".join(parts) + ")"


def _same_length(lo: str, hi: str) -> list[str]:
    """Patterns for the integers lo..hi, both written with the same number of digits."""
    if lo == hi:
        return [lo]
    if len(lo) == 1:
        return [f"[{lo}-{hi}]"]
    if lo[0] == hi[0]:
        return [lo[0] + p for p in _same_length(lo[1:], hi[1:])]
    rest = len(lo) - 1
    parts = [lo[0] + p for p in _same_length(lo[1:], "9" * rest)]
    if int(hi[0]) - int(lo[0]) > 1:
        parts.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}][0-9]{{{rest}}}")
    return parts + [hi[0] + p for p in _same_length("0" * rest, hi[1:])]


def size_pattern(limits: Limits) -> str:
    """`WIDTHxHEIGHT` within the width and height limits."""
    width = int_range_pattern(limits.min_width, limits.max_width)
    return f"^{width}x{int_range_pattern(limits.min_height, limits.max_height)}$"


def max_seconds(limits: Limits) -> float:
    """The longest `seconds` at the lowest frame rate; at a higher one the server shortens the
    video to `max_num_frames` and says so (the bound cannot depend on another field's value)."""
    return (limits.max_num_frames - 1) / limits.min_fps


def seconds_pattern(limits: Limits) -> str:
    """`seconds` as text: a plain decimal above 0 and at most `max_seconds`, whole seconds at the top."""
    top = math.floor(max_seconds(limits))
    fraction = "(?:\\.[0-9]+)?"
    parts = ["0\\.[0-9]*[1-9][0-9]*"]  # 0.x, not 0
    if top > 1:
        parts.append(int_range_pattern(1, top - 1) + fraction)
    if top >= 1:
        parts.append(f"{top}(?:\\.0+)?")
    return "^(?:" + "|".join(parts) + ")$"


def state_contract(
    schemas: dict, limits: Limits, spec: WanSpec, model_names: tuple[str, ...], lora_dirs: tuple[Path, ...]
) -> None:
    """Write the served bounds into the request schemas in `schemas` (OpenAPI components), and add
    `<Name>Form`: the same fields as multipart/form-data text parts, `input_reference` as a file."""
    for nested in ("LoraRef", "ImageReference"):
        for prop in schemas.get(nested, {}).get("properties", {}).values():
            _no_nul(prop)
    for name in ("GenerateRequest", "VideoCreateRequest"):
        if name not in schemas:
            continue
        schema = schemas[name]
        props = schema["properties"]
        for field, (low, high) in BOUNDS.items():
            _set_bounds(props[field], _limit(limits, low), _limit(limits, high))
        for field in ("prompt", "negative_prompt"):
            _branch(props[field], "string")["maxLength"] = limits.max_prompt_chars
        for prop in props.values():
            _no_nul(prop)
        props["prompt"].update(minLength=1, pattern=NOT_BLANK)
        _branch(props["preset"], "string")["enum"] = sorted(PRESETS)
        if not lora_dirs:  # no --lora-dir: any named LoRA is refused
            _branch(props["loras"], "array")["maxItems"] = 0
        if spec.image_input == "none":  # text-to-video: an image is refused
            del props[IMAGE_FIELD]
        elif spec.image_input == "required":
            schema["required"] = sorted({*schema.get("required", []), IMAGE_FIELD})
        if name == "VideoCreateRequest":
            _branch(props["model"], "string")["enum"] = list(model_names)
            _branch(props["size"], "string")["pattern"] = size_pattern(limits)
            _branch(props["seconds"], "string")["pattern"] = seconds_pattern(limits)
            for kind in ("integer", "number"):
                _branch(props["seconds"], kind).update(exclusiveMinimum=0, maximum=max_seconds(limits))
        schemas[f"{name}Form"] = form_schema(schema)


def form_schema(schema: dict) -> dict:
    """The JSON body's schema as form fields: scalar fields only (a form has no lists of objects),
    none of them null (a text part cannot be), `input_reference` a file part."""
    form = {"type": "object", "additionalProperties": False, "required": schema.get("required", [])}
    props = {}
    for field, prop in schema["properties"].items():
        if field == "loras":
            continue
        if field == IMAGE_FIELD:
            props[field] = {"type": "string", "format": "binary"}
            continue
        prop = copy.deepcopy(prop)
        branches = [b for b in prop.pop("anyOf", [prop]) if b.get("type") != "null"]
        if any(b.get("type") == "string" for b in branches):  # `seconds`: on a form, a number is text too
            branches = [b for b in branches if b.get("type") == "string"]
        props[field] = {**prop, **branches[0]} if len(branches) == 1 else {**prop, "anyOf": branches}
        props[field].pop("default", None)
    form["properties"] = props
    return form


def _no_nul(prop: dict) -> None:
    branch = _branch(prop, "string", missing_ok=True)
    if branch is not None and "enum" not in branch and "pattern" not in branch and "format" not in branch:
        branch["pattern"] = NO_NUL


def _limit(limits: Limits, bound: str | float) -> float:
    return getattr(limits, bound) if isinstance(bound, str) else bound


def _set_bounds(prop: dict, low: float, high: float) -> None:
    for kind in ("integer", "number"):
        if (branch := _branch(prop, kind, missing_ok=True)) is not None:
            branch.update(minimum=low, maximum=high)


def _branch(prop: dict, kind: str, missing_ok: bool = False) -> dict | None:
    """The part of a property's schema for values of JSON type `kind` (`anyOf` with null, or plain)."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == kind:
            return branch
    if missing_ok:
        return None
    raise KeyError(f"no {kind} branch in {prop}")


def state_keys(schema: dict, open_paths: frozenset[str]) -> None:
    """With API keys on: the bearer scheme, and a 401 (in its API's error shape) on every
    operation but the open ones (the probes, and the docs when they are kept open)."""
    schema.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "One of the server's --api-key values",
    }
    for path, operations in schema.get("paths", {}).items():
        if path in open_paths:
            continue
        body = "OpenAIError" if path.startswith("/v1/") or path == "/v1" else "ErrorResponse"
        for operation in operations.values():
            operation["security"] = [{"apiKey": []}]
            operation.setdefault("responses", {})["401"] = {
                "description": "Missing or invalid API key",
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
            }
