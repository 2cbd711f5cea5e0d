"""What a Wan checkpoint directory is, read from its JSON files only (no weights, no torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Wan2.2 T2V-A14B model-card values (shared/reference/wan22-formats.md, section 1.9).
A14B_DEFAULTS = {
    "height": 720,
    "width": 1280,
    "num_frames": 81,
    "num_inference_steps": 40,
    "guidance_scale": 4.0,
    "guidance_scale_2": 3.0,
    "fps": 16,
}
# A checkpoint may carry its own smaller defaults in this file (the tiny ones do).
DEFAULTS_FILE = "reelserve_defaults.json"


class CheckpointLayoutError(ValueError):
    """The directory is not a Wan checkpoint in the diffusers layout; the message names the fix."""


@dataclass(frozen=True)
class WanSpec:
    model_dir: Path
    expert_names: tuple[str, ...]  # ("transformer",) or ("transformer", "transformer_2")
    boundary_ratio: float | None
    vae_scale_temporal: int
    vae_scale_spatial: int
    patch_size: tuple[int, int, int]
    latent_channels: int
    defaults: dict

    @property
    def spatial_multiple(self) -> int:
        """Height and width must be multiples of this (VAE stride times transformer patch)."""
        return self.vae_scale_spatial * self.patch_size[1]

    def boundary_timestep(self, num_train_timesteps: int = 1000) -> float | None:
        return None if self.boundary_ratio is None else self.boundary_ratio * num_train_timesteps


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointLayoutError(f"{path} is missing; a diffusers Wan checkpoint has one (is --model right?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointLayoutError(f"{path} is not valid JSON: {e}") from e


def read_spec(model_dir: str | Path) -> WanSpec:
    root = Path(model_dir)
    index = _read_json(root / "model_index.json")
    experts = tuple(n for n in ("transformer", "transformer_2") if (index.get(n) or [None])[0] is not None)
    if not experts:
        raise CheckpointLayoutError(f"{root / 'model_index.json'} names no transformer")
    if index.get("expand_timesteps"):
        raise CheckpointLayoutError(f"{root}: expand_timesteps (TI2V-5B) checkpoints are not supported yet")
    transformer = _read_json(root / experts[0] / "config.json")
    vae = _read_json(root / "vae" / "config.json")
    temporal = int(vae.get("scale_factor_temporal") or 2 ** sum(vae.get("temperal_downsample", [])))
    spatial = int(vae.get("scale_factor_spatial") or 2 ** len(vae.get("temperal_downsample", [])))
    defaults = dict(A14B_DEFAULTS)
    if (root / DEFAULTS_FILE).is_file():
        defaults.update(_read_json(root / DEFAULTS_FILE))
    boundary = index.get("boundary_ratio")
    if boundary is not None and len(experts) < 2:
        raise CheckpointLayoutError(f"{root / 'model_index.json'}: boundary_ratio is set but transformer_2 is absent")
    return WanSpec(
        model_dir=root,
        expert_names=experts,
        boundary_ratio=None if boundary is None else float(boundary),
        vae_scale_temporal=temporal,
        vae_scale_spatial=spatial,
        patch_size=tuple(transformer.get("patch_size", (1, 2, 2))),
        latent_channels=int(transformer.get("in_channels", 16)),
        defaults=defaults,
    )
