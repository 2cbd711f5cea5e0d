"""The LoRAs a server may use: directories per-request LoRAs come from, and files fused at load.
Torch-free; `serve.lora.options.lora_options` turns it into the runner's `LoraOptions`."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from serve.frozen import FrozenConfig, flag


class FusedLoraFile(FrozenConfig):
    """One LoRA fused into an expert's weights once, at load."""

    path: Path
    """The LoRA's safetensors file."""
    expert: int = Field(ge=0, le=1)
    """0: the high-noise `transformer` (`--lora-high`), 1: the low-noise `transformer_2` (`--lora-low`)."""
    scale: float = 1.0
    """Multiplier of the LoRA's delta (`--lora-high-scale`, `--lora-low-scale`)."""


class LoraConfig(FrozenConfig):
    """LoRAs fused at load and the directories requests may name LoRAs from."""

    dirs: tuple[Path, ...] = Field((), json_schema_extra=flag("--lora-dir"))
    """Directories LoRA files may come from (`--lora-dir`, repeatable); requests may name LoRAs inside
    them, applied per request. Empty: requests may not name LoRAs."""
    fused: tuple[FusedLoraFile, ...] = ()
    """LoRAs fused into the weights at load (`--lora-high FILE --lora-high-scale S`, `--lora-low ...`):
    the fast path for a server of one distilled model."""
