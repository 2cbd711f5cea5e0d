"""Per-request LoRA: `W x + scale * (alpha/rank) * B(A x)` for the rows of a batch that carry it.

Requests that share a batch usually share a LoRA set (it is part of the batch key), but the
applier takes one set per row anyway, so a batch that mixes sets is still correct. Forward
hooks are installed for one forward pass and removed after it: no module is replaced, so
parameter names, the loader and the residency manager see the plain model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from serve.lora.keys import Rename
from serve.lora.paths import named_lora_files
from serve.lora.weights import LoraError, LoraLayer, read_lora

LoraSet = tuple[tuple[str, float], ...]  # GenerationParams.loras: (name, scale) pairs


@dataclass(frozen=True)
class _DeviceLayer:
    """A LoRA layer in the model's dtype on the model's device, ready for `delta(x)`."""

    down: torch.Tensor | None
    up: torch.Tensor | None
    scaling: float
    diff: torch.Tensor | None
    diff_b: torch.Tensor | None

    @classmethod
    def of(cls, layer: LoraLayer, like: torch.Tensor) -> _DeviceLayer:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=like.device, dtype=like.dtype)

        return cls(move(layer.down), move(layer.up), layer.scaling, move(layer.diff), move(layer.diff_b))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        if self.down is not None:
            out = F.linear(F.linear(x, self.down), self.up) * self.scaling
        if self.diff is not None:
            out = out + F.linear(x, self.diff)
        if self.diff_b is not None:
            out = out + self.diff_b
        return out


RuntimeLora = dict[str, _DeviceLayer]  # module name -> layer, for one expert


class LoraRegistry:
    """LoRAs that requests name, loaded from the LoRA directories on first use and kept on device."""

    def __init__(
        self, lora_dirs: Sequence[Path], experts: Sequence[torch.nn.Module], rename: Rename | None = None
    ) -> None:
        """`rename`: the model family's LoRA module names -> the model's (see serve.lora.keys)."""
        self.rename = rename
        self.lora_dirs = tuple(Path(d) for d in lora_dirs)
        self.experts = list(experts)
        self._loaded: dict[str, dict[int, RuntimeLora]] = {}

    def for_expert(self, loras: LoraSet, expert: int) -> list[tuple[RuntimeLora, float]]:
        """The request's LoRAs that have weights for `expert`, each with its scale."""
        return [(self._load(name)[expert], scale) for name, scale in loras if expert in self._load(name)]

    def _load(self, name: str) -> dict[int, RuntimeLora]:
        if name not in self._loaded:
            files = named_lora_files(name, self.lora_dirs, len(self.experts))
            try:
                self._loaded[name] = {i: self._to_runtime(path, self.experts[i]) for i, path in files.items()}
            except (LoraError, OSError) as e:
                # The message goes back to the client that named this LoRA: say which, not where it is.
                raise LoraError(_named(str(e), name, files.values())) from e
        return self._loaded[name]

    def _to_runtime(self, path: Path, model: torch.nn.Module) -> RuntimeLora:
        lora = read_lora(path, model, fuse=False, rename=self.rename)
        modules = dict(model.named_modules())
        for name, layer in lora.layers.items():
            if not hasattr(modules[name], "in_features"):  # nn.Linear, or a quantized linear
                raise LoraError(
                    f"{path}: {next(iter(layer.keys.values()))!r} changes {name!r}, not a Linear; such a LoRA "
                    "can only be fused at load (--lora-high/--lora-low), not applied per request"
                )
        # The LoRA runs in the activations' dtype: a quantized layer's weight is int8/fp8, so take
        # the dtype and device from the model's first float parameter (the unquantized patch embedding).
        like = next(p for p in model.parameters() if p.is_floating_point())
        return {name: _DeviceLayer.of(layer, like) for name, layer in lora.layers.items()}


def _named(message: str, name: str, paths) -> str:
    """`message` with each of the LoRA's file paths replaced by its name and file (`read_lora`'s
    messages start with the path, which is right for the operator's own --lora-high/--lora-low)."""
    for path in paths:
        message = message.replace(str(path), f"LoRA {name!r} ({path.name})")
    return message if message.startswith("LoRA ") else f"LoRA {name!r}: {message}"


@contextlib.contextmanager
def apply_loras(model: torch.nn.Module, row_loras: Sequence[list[tuple[RuntimeLora, float]]]) -> Iterator[None]:
    """Within the block, `model`'s forward adds each row's LoRAs; `row_loras[i]` is row i's list."""
    groups = _group_rows(row_loras)
    targets = {name for _, items in groups for lora, _ in items for name in lora}
    if not targets:
        yield
        return
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(_hook(name, groups)) for name in sorted(targets)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _group_rows(row_loras: Sequence[list[tuple[RuntimeLora, float]]]):
    """[(rows or None for all, [(lora, scale), ...])]: rows that carry the same LoRA set run together."""
    by_set: dict[tuple, tuple[list[int], list]] = {}
    for row, items in enumerate(row_loras):
        key = tuple((id(lora), scale) for lora, scale in items)
        by_set.setdefault(key, ([], items))[0].append(row)
    if len(by_set) == 1:
        ((_, items),) = by_set.values()
        return [(None, items)]
    return [(torch.tensor(rows), items) for rows, items in by_set.values() if items]


def _hook(name: str, groups):
    def add_deltas(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for rows, items in groups:
            layers = [(lora[name], scale) for lora, scale in items if name in lora]
            if not layers:
                continue
            xs = x if rows is None else x[rows.to(x.device)]
            delta = sum(scale * layer.delta(xs) for layer, scale in layers)
            output = output + delta if rows is None else output.index_add(0, rows.to(x.device), delta)
        return output

    return add_deltas
