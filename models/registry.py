"""Which model family and variant a checkpoint is: model_index.json `_class_name` plus configs.

Torch-free: the API process resolves the checkpoint here (for defaults, size rounding, token
counts) and only the worker imports the variant's torch code, by the path in `ModelEntry.stages`.
A new family or variant is one row in `VARIANTS` and its files under `models/<family>/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.wan.spec import CheckpointLayoutError, WanSpec, expert_names, read_json, read_spec


class UnsupportedModelError(CheckpointLayoutError):
    """A readable checkpoint of a kind reelserve does not serve; the message names what and why."""


@dataclass(frozen=True)
class ModelEntry:
    family: str
    variant: str
    spec: WanSpec
    stages: str
    """`module:class` of the variant's stage assembly (torch code, imported in the worker only)."""


# variant -> (family, stages). The stage classes live one file per variant.
VARIANTS: dict[str, tuple[str, str]] = {
    "t2v": ("wan", "models.wan.t2v:WanT2V"),
    "i2v": ("wan", "models.wan.i2v:WanI2V"),
    "ti2v": ("wan", "models.wan.ti2v:WanTI2V"),
}
SUPPORTED = (
    "WanPipeline (Wan2.1 T2V, Wan2.2 T2V-A14B, Wan2.2 TI2V-5B with expand_timesteps), "
    "WanImageToVideoPipeline (Wan2.2 I2V-A14B)"
)


def resolve(model_dir: str | Path) -> ModelEntry:
    """The family, variant and spec of the checkpoint at `model_dir`."""
    root = Path(model_dir)
    index = read_json(root / "model_index.json")
    variant = resolve_variant(root, index)
    family, stages = VARIANTS[variant]
    return ModelEntry(family, variant, read_spec(root, variant), stages)


def resolve_variant(root: Path, index: dict) -> str:
    """The variant a model_index.json (and its first transformer's config) describes."""
    where = root / "model_index.json"
    name = index.get("_class_name")
    if name not in ("WanPipeline", "WanImageToVideoPipeline"):
        raise UnsupportedModelError(f"{where}: pipeline class {name!r} is not supported; reelserve serves {SUPPORTED}")
    transformer = read_json(root / expert_names(root, index)[0] / "config.json")
    if index.get("expand_timesteps"):
        return "ti2v"
    channels = transformer.get("in_channels")
    if name == "WanPipeline":
        if channels != transformer.get("out_channels", channels):
            raise UnsupportedModelError(f"{where}: WanPipeline with in_channels {channels} != out_channels is unknown")
        return "t2v"
    if transformer.get("image_dim") is not None:
        raise UnsupportedModelError(
            f"{where}: a Wan2.1 image-to-video checkpoint (CLIP image encoder, image_dim "
            f"{transformer['image_dim']}) is not supported; reelserve serves {SUPPORTED}"
        )
    noise = transformer.get("out_channels", 16)
    if channels != 2 * noise + 4:
        raise UnsupportedModelError(
            f"{where}: image-to-video needs in_channels = noise + 4 mask + image latents = {2 * noise + 4}, "
            f"the transformer config has {channels}"
        )
    return "i2v"
