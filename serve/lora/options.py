"""How a runner is told about LoRAs: the directories they may come from, and those fused at load
(resolved from the server's `serve.lora.config.LoraConfig` by `lora_options`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from serve.lora.config import LoraConfig
from serve.lora.fuse import fuse_lora
from serve.lora.keys import Rename
from serve.lora.paths import resolve_lora_path
from serve.lora.weights import LoraError, read_lora

EXPERT_NAMES = ("high", "low")


@dataclass(frozen=True)
class FusedLora:
    path: Path
    """Absolute, or relative to one of the LoRA directories; must resolve inside one of them."""
    expert: int
    """0: the high-noise `transformer`, 1: the low-noise `transformer_2`."""
    scale: float = 1.0


@dataclass(frozen=True)
class LoraOptions:
    lora_dirs: tuple[Path, ...] = ()
    """The only places LoRA files are read from. Empty: no per-request LoRAs."""
    fused: tuple[FusedLora, ...] = ()
    """Fused into the weights once at load (the fast path for a server of one distilled model)."""
    per_request: bool = True
    """Whether requests may name LoRAs from `lora_dirs` (applied per request, not fused)."""


def lora_options(config: LoraConfig) -> LoraOptions:
    """The runner's options from the server's `LoraConfig`."""
    fused_dirs = tuple(dict.fromkeys(f.path.resolve().parent for f in config.fused))
    return LoraOptions(
        # The operator's own command line is trusted: files fused at load may sit outside
        # --lora-dir; per-request LoRAs never do (per_request is set only with --lora-dir).
        lora_dirs=config.dirs or fused_dirs,
        fused=tuple(FusedLora(f.path, f.expert, f.scale) for f in config.fused),
        per_request=bool(config.dirs),
    )


def fuse_configured(
    experts: Sequence[torch.nn.Module], options: LoraOptions, rename: Rename | None = None
) -> list[str]:
    """Fuse every `options.fused` LoRA into its expert; returns one line per LoRA for the log."""
    done = []
    for lora in options.fused:
        if lora.expert >= len(experts):
            raise LoraError(
                f"LoRA {lora.path} is for the {EXPERT_NAMES[lora.expert]}-noise expert, but the model has "
                f"{len(experts)} transformer(s); drop --lora-{EXPERT_NAMES[lora.expert]}"
            )
        path = resolve_lora_path(lora.path, options.lora_dirs)
        count = fuse_lora(experts[lora.expert], read_lora(path, experts[lora.expert], rename=rename), lora.scale)
        done.append(f"fused {path} into the {EXPERT_NAMES[lora.expert]}-noise expert ({count} modules, x{lora.scale})")
    return done
