"""The server's weight quantization, as the operator wrote it. Torch-free: the schemes themselves
(`serve.quant.schemes`) hold torch dtypes, so the policy text is parsed against the checkpoint's
experts where both are known (`ServerConfig`) and turned into a `QuantPolicy` in the worker."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from serve.frozen import FrozenConfig, flag


class QuantizationConfig(FrozenConfig):
    """Per-expert weight quantization applied while loading (none by default)."""

    policy: str | None = Field(None, json_schema_extra=flag("--quant"))
    """Per-expert quantization, e.g. `w8a8-int8` (all experts) or `high=w8a8-int8,low=none`; schemes:
    int8-wo, w8a8-int8, fp8-wo, w8a8-fp8, none (`--quant`)."""
    skip: tuple[str, ...] = Field((), json_schema_extra=flag("--quant-skip"))
    """Regexes of extra layers kept in float, on top of the embedders, norms and output projection
    (`--quant-skip`, repeatable)."""

    @field_validator("skip")
    @classmethod
    def _regexes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regex ({exc}); escape it or drop it") from None
        return value
