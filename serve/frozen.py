"""The base of every config in the tree (`serve.config.ServerConfig` and the per-package
sub-configs it nests): typed, frozen, validated once, each field documented by its attribute
docstring. Torch-free, so the API process and the CLI parser can import every config.

A field's command-line flag is derived from its name (`max_queue` -> `--max-queue`); `flag()`
names it where the flag reads differently from the field (`tile_sample_size` -> `--vae-tile`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class FrozenConfig(BaseModel):
    # Attribute docstrings become field descriptions (shown in `--help` and the OpenAPI schema).
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


def flag(name: str, **cli: Any) -> dict[str, Any]:
    """`Field(json_schema_extra=flag("--vae-tile"))`: the field's flag, and argparse keywords
    its annotation cannot say (`choices` computed at import, a `metavar`)."""
    return {"flag": name, **cli}
