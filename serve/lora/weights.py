"""Read a LoRA safetensors file and check every tensor against the expert it targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from serve.lora.keys import Rename, parse_key


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this model; the message names the file and the key."""


@dataclass
class LoraLayer:
    """Everything one LoRA file holds for one module, in fp32 on the CPU.

    delta W = (alpha / rank) * up @ down + diff;  delta b = diff_b. A missing alpha means
    alpha = rank (PEFT's default, and what diffusers assumes when a file has no alpha keys).
    """

    module: str
    keys: dict[str, str] = field(default_factory=dict)  # kind -> tensor name in the file, for errors
    down: torch.Tensor | None = None  # (rank, in_features)
    up: torch.Tensor | None = None  # (out_features, rank)
    alpha: float | None = None
    diff: torch.Tensor | None = None  # same shape as the module's weight
    diff_b: torch.Tensor | None = None  # same shape as the module's bias

    @property
    def scaling(self) -> float:
        if self.down is None or self.alpha is None:
            return 1.0
        return self.alpha / self.down.shape[0]

    def weight_delta(self) -> torch.Tensor | None:
        """The unscaled (user scale 1) change to the module's weight, fp32."""
        delta = None
        if self.down is not None:
            delta = self.scaling * (self.up @ self.down)
        if self.diff is not None:
            delta = self.diff if delta is None else delta + self.diff
        return delta


@dataclass
class LoraWeights:
    """One LoRA file, validated against one expert: module name -> layer."""

    source: Path
    layers: dict[str, LoraLayer]


def read_lora(path: Path, model: torch.nn.Module, fuse: bool = True, rename: Rename | None = None) -> LoraWeights:
    """Read `path` (safetensors only, never pickle) and validate it against `model`; `rename` maps
    the file's module names to the model's (the model family's table, see `parse_key`).

    `fuse=False` (applied per request, on the layer's output) also accepts quantized linears:
    B(A x) is added after the layer whatever its weight storage; fusing needs a float weight."""
    tensors = _read_tensors(path)
    if not tensors:
        raise LoraError(f"{path}: holds no tensors; is it a LoRA file?")
    modules = dict(model.named_modules())
    layers: dict[str, LoraLayer] = {}
    for key, tensor in tensors.items():
        parsed = parse_key(key, rename)
        if parsed is None:
            raise LoraError(
                f"{path}: key {key!r} is not a LoRA tensor (expected a name ending in lora_down/lora_A, "
                "lora_up/lora_B, alpha, diff or diff_b)"
            )
        module, kind = parsed
        if module not in modules:
            raise LoraError(
                f"{path}: key {key!r} targets {module!r}, which this transformer does not have "
                "(a LoRA for another model, or more blocks than the checkpoint has?)"
            )
        layer = layers.setdefault(module, LoraLayer(module))
        layer.keys[kind] = key
        if kind == "alpha":
            layer.alpha = _alpha(path, key, tensor)
        else:
            setattr(layer, kind, tensor.float())
    for layer in layers.values():
        _check_layer(path, layer, modules[layer.module], fuse)
    return LoraWeights(source=path, layers=layers)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: only .safetensors LoRA files are read (no pickle); convert it first")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError) as e:
        raise LoraError(f"{path}: not a readable safetensors file ({e})") from e


def _alpha(path: Path, key: str, tensor: torch.Tensor) -> float:
    if tensor.numel() != 1:
        raise LoraError(f"{path}: {key!r} must be a scalar, got shape {tuple(tensor.shape)}")
    return float(tensor.float().item())


def _check_layer(path: Path, layer: LoraLayer, module: torch.nn.Module, fuse: bool) -> None:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if layer.down is not None or layer.up is not None:
        _check_pair(path, layer, module, fuse)
    elif layer.alpha is not None:
        raise LoraError(f"{path}: {layer.keys['alpha']!r} has no lora_down/lora_up pair")
    if layer.diff is not None and (weight is None or layer.diff.shape != weight.shape):
        expected = None if weight is None else tuple(weight.shape)
        raise LoraError(f"{path}: {layer.keys['diff']!r} has shape {tuple(layer.diff.shape)}, expected {expected}")
    if layer.diff_b is not None and (bias is None or layer.diff_b.shape != bias.shape):
        expected = None if bias is None else tuple(bias.shape)
        raise LoraError(f"{path}: {layer.keys['diff_b']!r} has shape {tuple(layer.diff_b.shape)}, expected {expected}")


def _check_pair(path: Path, layer: LoraLayer, module: torch.nn.Module, fuse: bool) -> None:
    key = layer.keys.get("down") or layer.keys["up"]
    linear_like = isinstance(module, torch.nn.Linear) or (not fuse and hasattr(module, "in_features"))
    if not linear_like:
        raise LoraError(f"{path}: {key!r} targets {layer.module!r}, a {type(module).__name__}; LoRA needs a Linear")
    if layer.down is None or layer.up is None:
        missing = "lora_down/lora_A" if layer.down is None else "lora_up/lora_B"
        raise LoraError(f"{path}: {key!r} has no matching {missing} tensor")
    down, up = layer.down, layer.up
    if down.ndim != 2 or down.shape[1] != module.in_features:
        raise LoraError(
            f"{path}: {layer.keys['down']!r} has shape {tuple(down.shape)}, expected (rank, {module.in_features})"
        )
    if up.ndim != 2 or up.shape != (module.out_features, down.shape[0]):
        raise LoraError(
            f"{path}: {layer.keys['up']!r} has shape {tuple(up.shape)}, expected "
            f"({module.out_features}, {down.shape[0]}) to match rank {down.shape[0]} of {layer.keys['down']!r}"
        )
