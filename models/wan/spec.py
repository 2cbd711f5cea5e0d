"""What a Wan checkpoint directory is, read from its JSON files only (no weights, no torch).

The spec owns everything about a Wan variant that the API and the scheduler need without torch:
latent shape, transformer token count, size rounding, request defaults and the expert layout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Model-card values per variant (shared/reference/wan22-formats.md, section 1.9). A14B I2V: the
# official config's guidance (3.5, 3.5); TI2V-5B: 704x1280, 121 frames at 24 fps, guidance 5.
VARIANT_DEFAULTS = {
    "t2v": {
        "height": 720,
        "width": 1280,
        "num_frames": 81,
        "num_inference_steps": 40,
        "guidance_scale": 4.0,
        "guidance_scale_2": 3.0,
        "fps": 16,
    },
    "i2v": {
        "height": 720,
        "width": 1280,
        "num_frames": 81,
        "num_inference_steps": 40,
        "guidance_scale": 3.5,
        "guidance_scale_2": 3.5,
        "fps": 16,
    },
    "ti2v": {
        "height": 704,
        "width": 1280,
        "num_frames": 121,
        "num_inference_steps": 50,
        "guidance_scale": 5.0,
        "guidance_scale_2": 5.0,
        "fps": 24,
    },
}
A14B_DEFAULTS = VARIANT_DEFAULTS["t2v"]
# A checkpoint may carry its own smaller defaults in this file (the tiny ones do).
DEFAULTS_FILE = "reelserve_defaults.json"
# What a request of each variant does with a conditioning image.
IMAGE_INPUT = {"t2v": "none", "i2v": "required", "ti2v": "optional"}


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
    """Channels of the noise latent: the VAE's z_dim (16 for the Wan2.1 VAE, 48 for Wan2.2's)."""
    defaults: dict
    image_input: str = "none"
    """Whether a request carries a conditioning image: "none" (text-to-video), "required"
    (image-to-video, I2V-A14B) or "optional" (TI2V-5B: text-only or text+image)."""
    variant: str = "t2v"
    """t2v (Wan2.1 / Wan2.2 T2V-A14B), i2v (Wan2.2 I2V-A14B) or ti2v (Wan2.2 TI2V-5B)."""
    expand_timesteps: bool = False
    """Per-token timesteps (TI2V-5B): the first frame's tokens sit at t=0 when an image is given."""

    @property
    def spatial_multiple(self) -> int:
        """Height and width must be multiples of this (VAE stride times transformer patch)."""
        return self.vae_scale_spatial * self.patch_size[1]

    def boundary_timestep(self, num_train_timesteps: int = 1000) -> float | None:
        return None if self.boundary_ratio is None else self.boundary_ratio * num_train_timesteps

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.vae_scale_temporal + 1

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, int, int, int, int]:
        """(1, C, F, H, W) of one request's noise latent."""
        s = self.vae_scale_spatial
        return (1, self.latent_channels, self.latent_frames(num_frames), height // s, width // s)

    def tokens(self, height: int, width: int, num_frames: int) -> int:
        """Transformer sequence length: latent frames x latent height / patch x latent width / patch."""
        strides = (self.vae_scale_temporal, self.vae_scale_spatial, self.patch_size)
        return latent_tokens(height, width, num_frames, *strides)

    def round_size(self, values: dict) -> list[str]:
        """Round height, width and num_frames in `values` down to what the model takes (in place);
        return what changed, e.g. "height=70->64"."""
        multiple, temporal = self.spatial_multiple, self.vae_scale_temporal
        rounded = {
            "height": max(multiple, values["height"] // multiple * multiple),
            "width": max(multiple, values["width"] // multiple * multiple),
            "num_frames": (values["num_frames"] - 1) // temporal * temporal + 1,
        }
        changes = [f"{name}={values[name]}->{new}" for name, new in rounded.items() if new != values[name]]
        values.update(rounded)
        return changes


def latent_tokens(
    height: int, width: int, num_frames: int, temporal: int, spatial: int, patch: tuple[int, int, int]
) -> int:
    """The one token-count formula: (frames - 1) // temporal + 1 latent frames, each of
    (height / (spatial x patch_h)) x (width / (spatial x patch_w)) patches."""
    _, ph, pw = patch
    return ((num_frames - 1) // temporal + 1) * (height // (spatial * ph)) * (width // (spatial * pw))


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointLayoutError(f"{path} is missing; a diffusers Wan checkpoint has one (is --model right?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointLayoutError(f"{path} is not valid JSON: {e}") from e


def read_spec(model_dir: str | Path, variant: str | None = None) -> WanSpec:
    """The spec of a Wan checkpoint; `variant` as the registry resolved it (None: resolve here)."""
    root = Path(model_dir)
    index = read_json(root / "model_index.json")
    if variant is None:
        from models.registry import resolve_variant

        variant = resolve_variant(root, index)
    experts = expert_names(root, index)
    transformer = read_json(root / experts[0] / "config.json")
    vae = read_json(root / "vae" / "config.json")
    temporal = int(vae.get("scale_factor_temporal") or 2 ** sum(vae.get("temperal_downsample", [])))
    spatial = int(vae.get("scale_factor_spatial") or 2 ** len(vae.get("temperal_downsample", [])))
    defaults = dict(VARIANT_DEFAULTS[variant])
    if (root / DEFAULTS_FILE).is_file():
        defaults.update(read_json(root / DEFAULTS_FILE))
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
        latent_channels=int(vae.get("z_dim", transformer.get("out_channels", 16))),
        defaults=defaults,
        image_input=IMAGE_INPUT[variant],
        variant=variant,
        expand_timesteps=bool(index.get("expand_timesteps")),
    )


def expert_names(root: Path, index: dict) -> tuple[str, ...]:
    experts = tuple(n for n in ("transformer", "transformer_2") if (index.get(n) or [None])[0] is not None)
    if not experts:
        raise CheckpointLayoutError(f"{root / 'model_index.json'} names no transformer")
    return experts
