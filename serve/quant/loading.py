"""The loader's quantization hook: swap layers on meta before planning, check headers, quantize while streaming.

Two sources, one mechanism:
- a float checkpoint and a `QuantConfig`: each eligible layer's float weight is read, quantized on
  the host (fp32 arithmetic), and only the int8/fp8 tensor and its scale are moved to the device;
  the scale is *derived*, so the plan does not look for it in the files;
- a pre-quantized checkpoint (`reelserve quantize`): a layer is quantized iff `<layer>.weight_scale`
  is stored; the scheme is in the safetensors metadata; tensors are copied as stored, never upcast.
Every check below reads headers only, so a bad file fails before any weight byte is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from serve.loader.errors import CheckpointError
from serve.loader.index import CheckpointIndex, TensorInfo
from serve.quant.linear import QuantLinear
from serve.quant.ops import quantize_weight
from serve.quant.schemes import SCHEMES, QuantConfig, Scheme
from serve.quant.swap import eligible_linears, swap_linears

SCHEME_KEY = "reelserve.quant.scheme"
SKIP_KEY = "reelserve.quant.skip"
SCALE = "weight_scale"
FLOAT_TAGS = ("F64", "F32", "BF16", "F16")
QUANT_TAGS = {torch.int8: "I8", torch.float8_e4m3fn: "F8_E4M3"}
REQUANTIZE = "re-create it with `reelserve quantize` from the float checkpoint"


@dataclass(frozen=True)
class QuantLoader:
    """The quantized layers of one component being loaded, by module name."""

    layers: dict[str, QuantLinear]
    prequantized: bool

    def derived(self) -> frozenset[str]:
        """Slots filled as a by-product of quantizing their weight (not read from any file)."""
        return frozenset() if self.prequantized else frozenset(f"{n}.{SCALE}" for n in self.layers)

    def check_plan(self, plan: dict[Path, list[tuple[TensorInfo, object]]]) -> None:
        """Stored dtypes against the schemes, from headers: raises naming the file and tensor."""
        for items in plan.values():
            for info, slot in items:
                self._check(info, self._layer_of(slot.names[0]))

    def fill(self, slot_name: str, stored: torch.Tensor, device: torch.device) -> bool:
        """Place `stored` if it belongs to a quantized layer; False leaves it to the plain path."""
        layer, leaf = self._layer_of(slot_name)
        if layer is None:
            return False
        if self.prequantized:
            dtype = layer.scheme.storage if leaf == "weight" else torch.float32
            layer._buffers[leaf] = stored.to(device=device, dtype=dtype, copy=True)
        else:
            q, scale = quantize_weight(stored, layer.scheme.storage)  # on the host: no float copy on the device
            layer.set_quantized(q.to(device), scale.to(device))
        return True

    def _layer_of(self, slot_name: str) -> tuple[QuantLinear | None, str]:
        owner, _, leaf = slot_name.rpartition(".")
        layer = self.layers.get(owner)
        return (layer, leaf) if leaf in ("weight", SCALE) else (None, leaf)

    def _check(self, info: TensorInfo, found: tuple[QuantLinear | None, str]) -> None:
        layer, leaf = found
        if layer is None:
            if info.dtype in QUANT_TAGS.values():
                raise CheckpointError(
                    f"tensor {info.name!r} in {info.file} is stored as {info.dtype} but the checkpoint has no "
                    f"{info.name.rpartition('.')[0]}.{SCALE} for it, so it cannot be dequantized; {REQUANTIZE}"
                )
            return
        if leaf == SCALE:
            expected: tuple[str, ...] = ("F32",)
        elif self.prequantized:
            expected = (QUANT_TAGS[layer.scheme.storage],)
        else:
            expected = FLOAT_TAGS
        if info.dtype not in expected:
            raise CheckpointError(
                f"tensor {info.name!r} in {info.file} is {info.dtype}, expected {' or '.join(expected)} for "
                f"{'a pre-quantized' if self.prequantized else 'quantizing a float'} {layer.scheme.name} layer; "
                f"{REQUANTIZE}"
            )


def prepare_quant(
    module: nn.Module,
    index: CheckpointIndex,
    config: QuantConfig | None,
    keep_fp32: frozenset[str],
    dtype: torch.dtype,
) -> QuantLoader | None:
    """Swap the layers to quantize for empty quantized ones (on meta); None when nothing is quantized."""
    scales = sorted(n for n in index.tensors if n.endswith(f".{SCALE}"))
    if scales:
        spec = _runtime_scheme(stored_scheme(index, scales), config, index.root)
        names = [n.removesuffix(f".{SCALE}") for n in scales]
        _check_linears(module, names, index)
        return QuantLoader(swap_linears(module, names, spec, dtype), prequantized=True)
    if config is None:
        return None
    names = eligible_linears(module, config, keep_fp32)
    return QuantLoader(swap_linears(module, names, config.spec, dtype), prequantized=False)


def stored_scheme(index: CheckpointIndex, scales: list[str]) -> Scheme:
    """The scheme written in the metadata of every file that holds a scale (they must agree)."""
    files = sorted({index.tensors[n].file for n in scales})
    found: dict[str, Path] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:  # header only: no tensor is read here
            name = (f.metadata() or {}).get(SCHEME_KEY)
        if name not in SCHEMES:
            raise CheckpointError(
                f"{path} holds quantized tensors (e.g. {scales[0]!r}) but its safetensors metadata has "
                f"{SCHEME_KEY}={name!r}, not one of {', '.join(SCHEMES)}; {REQUANTIZE}"
            )
        found.setdefault(name, path)
    if len(found) > 1:
        (a, pa), (b, pb) = list(found.items())[:2]
        raise CheckpointError(f"{pa} is quantized as {a} but {pb} as {b}; one component has one scheme; {REQUANTIZE}")
    return SCHEMES[next(iter(found))]


def _runtime_scheme(stored: Scheme, config: QuantConfig | None, root: Path) -> Scheme:
    """A pre-quantized expert runs as stored, or with another scheme of the same storage (int8-wo <-> w8a8-int8)."""
    if config is None or config.spec == stored:
        return stored
    if config.spec.storage != stored.storage:
        raise CheckpointError(
            f"{root} is pre-quantized as {stored.name}; --quant asks for {config.scheme}, which stores "
            f"{config.spec.storage} weights. Point --model at the float checkpoint to quantize on load, "
            f"or ask for {stored.name} (or another scheme with {stored.storage} storage)"
        )
    return config.spec


def _check_linears(module: nn.Module, names: list[str], index: CheckpointIndex) -> None:
    modules = dict(module.named_modules())
    for name in names:
        if type(modules.get(name)) is not nn.Linear:
            info = index.tensors[f"{name}.{SCALE}"]
            raise CheckpointError(
                f"tensor {info.name!r} in {info.file}: {type(module).__name__} has no linear layer {name!r} "
                "to quantize; the weights do not match config.json"
            )
