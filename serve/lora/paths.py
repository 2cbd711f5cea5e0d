"""Where LoRA files may come from: only inside the configured LoRA directories.

A request names a LoRA; it must never name an arbitrary file on the server. Every path is
resolved (symlinks followed, `..` collapsed) before the containment check, so neither a
`../` in a name nor a symlink pointing out of the directory escapes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# Wan2.2-Lightning's release layout: one directory per LoRA, one file per expert.
EXPERT_FILES = ("high_noise_model.safetensors", "low_noise_model.safetensors")


class LoraPathError(ValueError):
    """A LoRA path or name that is missing or outside the configured LoRA directories."""


def resolve_lora_path(path: str | Path, lora_dirs: Sequence[Path]) -> Path:
    """`path` (absolute, or relative to one of `lora_dirs`) as a real `.safetensors` file inside them."""
    if not lora_dirs:
        raise LoraPathError(f"LoRA {path}: no LoRA directory is configured; add one with --lora-dir")
    roots = [Path(d).resolve() for d in lora_dirs]
    candidates = [Path(path)] if Path(path).is_absolute() else [root / path for root in roots]
    for candidate in candidates:
        real = candidate.resolve()
        inside = any(real.is_relative_to(root) for root in roots)
        if not inside:
            raise LoraPathError(
                f"LoRA {path} resolves to {real}, outside the LoRA directories {[str(r) for r in roots]}; "
                "copy it into one of them or add its directory with --lora-dir"
            )
        if real.is_file():
            if real.suffix != ".safetensors":
                raise LoraPathError(f"LoRA {real} is not a .safetensors file; only safetensors LoRAs are read")
            return real
    raise LoraPathError(f"LoRA {path} not found in the LoRA directories {[str(r) for r in roots]}")


def named_lora_files(name: str, lora_dirs: Sequence[Path], num_experts: int) -> dict[int, Path]:
    """Files of the LoRA a request calls `name`, by expert index (0 high noise, 1 low noise).

    `name/` holding `high_noise_model.safetensors` and/or `low_noise_model.safetensors` (the
    Lightning layout) gives one file per expert; `name.safetensors` goes to expert 0 only, as
    diffusers' `load_lora_weights` does by default.

    A request chose `name`, so every message names the LoRA, never a directory of this host.
    """
    if not name or name.startswith(("/", "\\")) or "\x00" in name:
        raise LoraPathError(f"LoRA name {name!r} must be a name relative to a LoRA directory")
    for root in lora_dirs:
        folder = (Path(root) / name).resolve()
        if not folder.is_relative_to(Path(root).resolve()):
            raise LoraPathError(f"LoRA name {name!r} leaves the LoRA directory; use a name inside it")
        if folder.is_dir():
            files = {i: folder / f for i, f in enumerate(EXPERT_FILES[:num_experts]) if (folder / f).exists()}
            if (folder / EXPERT_FILES[1]).exists() and num_experts < 2:
                raise LoraPathError(f"LoRA {name!r} has a low-noise file but the model has one transformer")
            if files:
                return {i: _resolve_named(name, p, lora_dirs) for i, p in files.items()}
            raise LoraPathError(f"LoRA {name!r} is a folder holding neither of {list(EXPERT_FILES)}")
    return {0: _resolve_named(name, name if name.endswith(".safetensors") else f"{name}.safetensors", lora_dirs)}


def _resolve_named(name: str, path: str | Path, lora_dirs: Sequence[Path]) -> Path:
    """`resolve_lora_path`, with its refusals reworded to name the LoRA instead of host paths."""
    try:
        return resolve_lora_path(path, lora_dirs)
    except LoraPathError as e:
        if "outside the LoRA directories" in str(e):
            reason = "resolves outside the LoRA directories (a symlink out of them?)"
        elif "not a .safetensors file" in str(e):
            reason = "is not a .safetensors file; only safetensors LoRAs are read"
        else:
            reason = "was not found in the LoRA directories"
        raise LoraPathError(f"LoRA {name!r} {reason}") from None
