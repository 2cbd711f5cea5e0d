"""Stream a component's safetensors into a module built on the meta device.

The plan (which file fills which parameter) is checked in full against the headers before any
weight byte is read, so a mismatched checkpoint fails in seconds, not after minutes of I/O.
Then the plan is cut into units of contiguous tensors (serve/loader/readers.py) that a few reader
threads place at once, each tensor straight to its device and dtype (serve/loader/staging.py):
on the CPU a tensor already stored in its target dtype stays a view of the file's mapping (no read,
no copy); other tensors are copied, to an accelerator through pinned staging buffers on a side
stream. Peak host memory is the loaded weights plus the pages of the units being read, never a
state dict.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn

from serve.loader.build import ComponentClass, build_empty
from serve.loader.config_check import open_component, shape_mismatch
from serve.loader.errors import CheckpointError
from serve.loader.index import CheckpointIndex, TensorInfo
from serve.loader.readers import ReadUnit, default_readers, read_all, split_units
from serve.loader.staging import Placer, StagedCopier, copy_to, zero_copy_or_copy

if TYPE_CHECKING:
    from serve.quant.loading import QuantLoader
    from serve.quant.schemes import QuantConfig


OpenedComponent = tuple[ComponentClass, dict, CheckpointIndex]
"""A component's class, config and index as `open_component` returns them, checked against each other."""


@dataclass(frozen=True)
class Slot:
    """One tensor of the module to fill. Tied parameters share one slot under several names."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    is_buffer: bool


def load_component(
    component_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    quant: QuantConfig | None = None,
    *,
    readers: int | None = None,
    zero_copy: bool = True,
    staged: bool | None = None,
    opened: OpenedComponent | None = None,
) -> nn.Module:
    """Load one component directory (`transformer/`, `vae/`, `text_encoder/`, ...) for inference.

    Floating tensors are placed on `device` in `dtype`, except those the module class keeps in
    fp32 (`_keep_in_fp32_modules`); integer and bool tensors keep their stored dtype.
    Raises `CheckpointError` naming the file and tensor when the directory does not match.
    With `quant`, eligible `nn.Linear` layers are quantized on the host as they are read (no float
    copy reaches the device); a pre-quantized checkpoint (`reelserve quantize`) is read as stored.

    How bytes move (the module is the same bit for bit either way): `readers` threads read at once
    (None: one per core, at most `readers.MAX_READERS`); `zero_copy` keeps CPU tensors whose stored
    dtype is the target dtype as views of the file's mapping (see `staging.zero_copy_or_copy` for the
    one condition it puts on the file); `staged` sends tensors through pinned staging buffers on a
    side stream (None: on CUDA devices). `opened`: what `open_component(component_dir)` returned, when
    the caller has already checked this directory (each check builds the module on meta once more).
    """
    from serve.quant.loading import prepare_quant  # not at the top: serve.quant imports the loader

    root, device = Path(component_dir), torch.device(device)
    component, config, index = opened or open_component(root)  # config vs headers first: nothing built yet
    module = build_empty(component, config)
    keep_fp32 = fp32_module_names(component, module, dtype)
    quantized = prepare_quant(module, index, quant, keep_fp32, dtype)
    plan = plan_load(module, index, quantized.derived() if quantized else frozenset())
    if quantized:
        quantized.check_plan(plan)
    target = _Target(device, dtype, keep_fp32, quantized)
    _read_units(module, split_units(plan, lambda item: item[0].nbytes), target, readers, zero_copy, staged)
    _finish(module, device, index)
    return module


@dataclass(frozen=True)
class _Target:
    """Where and in what dtype a component's tensors go."""

    device: torch.device
    dtype: torch.dtype
    keep_fp32: frozenset[str]
    quantized: QuantLoader | None


def _read_units(
    module: nn.Module, units: list[ReadUnit], target: _Target, readers: int | None, zero_copy: bool, staged: bool | None
) -> None:
    """Every unit read by a pool of readers; with staging, each reader thread owns its staging buffers."""
    if not (target.device.type == "cuda" if staged is None else staged):
        place = zero_copy_or_copy if zero_copy else copy_to
        if readers is None and zero_copy and _copied_bytes(units, target) == 0:
            readers = 1  # all views of the mapping: no bytes to share out, and starting threads is not free
        read_all(lambda unit: _load_file(module, unit, target, place), units, readers or default_readers(len(units)))
        return
    readers = readers or default_readers(len(units))
    copiers: dict[int, StagedCopier] = {}  # by reader thread; each thread only adds its own key

    def copier() -> StagedCopier:
        if threading.get_ident() not in copiers:
            copiers[threading.get_ident()] = StagedCopier(target.device)
        return copiers[threading.get_ident()]

    try:
        read_all(lambda unit: _load_file(module, unit, target, copier()), units, readers)
    finally:
        for each in copiers.values():
            each.finish()


# safetensors dtype tags of the floating formats a module may be loaded in.
FLOAT_TAGS = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def _copied_bytes(units: list[ReadUnit], target: _Target) -> int:
    """Bytes a zero-copy read on the CPU still copies: floating tensors stored in another dtype than their
    target (`target_dtype`'s rule), anything on another device, anything a quantizer rewrites."""
    if target.device.type != "cpu" or target.quantized is not None:
        return sum(unit.nbytes for unit in units)
    copied = 0
    for unit in units:
        for info, slot in unit.items:
            stored = FLOAT_TAGS.get(info.dtype)
            keep = target.keep_fp32.intersection(slot.names[0].split("."))
            if stored is not None and stored != (torch.float32 if keep else target.dtype):
                copied += info.nbytes
    return copied


def module_slots(module: nn.Module) -> dict[str, Slot]:
    """Every parameter and persistent buffer by state-dict name; tied names map to one shared slot."""
    by_tensor: dict[int, list[str]] = {}
    tensors: dict[int, tuple[torch.Tensor, bool]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
        tensors[id(param)] = (param, False)
    for name, buf in _persistent_buffers(module):
        by_tensor.setdefault(id(buf), []).append(name)
        tensors[id(buf)] = (buf, True)
    slots = {}
    for key, names in by_tensor.items():
        tensor, is_buffer = tensors[key]
        slot = Slot(tuple(names), tuple(tensor.shape), is_buffer)
        slots.update(dict.fromkeys(names, slot))
    return slots


def _persistent_buffers(module: nn.Module):
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                yield f"{prefix}.{name}" if prefix else name, buf


def plan_load(
    module: nn.Module, index: CheckpointIndex, derived: frozenset[str] = frozenset()
) -> dict[Path, list[tuple[TensorInfo, Slot]]]:
    """Which tensor of which file fills which slot; raises on unexpected, mis-shaped or missing tensors.

    `derived` names slots filled as a by-product of another tensor (quantization scales), not from a file.
    """
    slots = module_slots(module)
    ignore = [re.compile(p) for p in getattr(module, "_keys_to_ignore_on_load_unexpected", None) or []]
    plan: dict[Path, list[tuple[TensorInfo, Slot]]] = {}
    filled: set[tuple[str, ...]] = set()
    for path, infos in index.by_file().items():
        for info in infos:
            slot = _slot_for(module, slots, info, ignore)
            # A tied parameter saved under both of its names is one parameter: fill it from the
            # first name found, as transformers' tie_weights leaves one tensor for both names.
            if slot is None or slot.names in filled:
                continue
            filled.add(slot.names)
            plan.setdefault(path, []).append((info, slot))
    filled.update(slots[name].names for name in derived)
    _check_all_filled(module, slots, filled, index)
    return plan


def _slot_for(module: nn.Module, slots: dict[str, Slot], info: TensorInfo, ignore: list[re.Pattern]) -> Slot | None:
    slot = slots.get(info.name)
    if slot is None:
        if any(p.search(info.name) for p in ignore):
            return None  # the class declares this leftover key harmless (e.g. Wan's norm_added_q)
        raise CheckpointError(
            f"unexpected tensor {info.name!r} in {info.file}: {type(module).__name__} has no such parameter "
            "or buffer; the weights do not match config.json (wrong folder or a different model version?)"
        )
    if slot.shape != info.shape:
        raise shape_mismatch(info, type(module).__name__, slot.shape)
    return slot


def _check_all_filled(module: nn.Module, slots: dict[str, Slot], filled: set, index: CheckpointIndex) -> None:
    missing = sorted({s.names for s in slots.values()} - filled)
    if missing:
        names = [n[0] for n in missing]
        where = f"{index.source} or the shards it lists" if index.source.suffix == ".json" else index.source
        more = f" ({len(names)} missing in all: {', '.join(names[:5])}{' ...' * (len(names) > 5)})"
        raise CheckpointError(
            f"tensor {names[0]!r} is missing: {type(module).__name__} needs it but it is not in {where}"
            f"{more if len(names) > 1 else ''}; the checkpoint is incomplete or does not match config.json"
        )


def fp32_module_names(component: ComponentClass, module: nn.Module, dtype: torch.dtype) -> frozenset[str]:
    """Module names whose floating tensors stay fp32, per the class's own declaration.

    diffusers keeps `_keep_in_fp32_modules` in fp32 for any dtype. transformers keeps
    `_keep_in_fp32_modules` only when loading fp16 (T5's `wo` overflows in fp16, bf16 has the
    range) and `_keep_in_fp32_modules_strict` for fp16 and bf16 (`_get_dtype_plan` in 5.x).
    """
    if component.library == "diffusers":
        return frozenset(getattr(module, "_keep_in_fp32_modules", None) or ())
    names: set[str] = set()
    if dtype in (torch.float16, torch.bfloat16):
        names |= set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        names |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
    return frozenset(names)


def target_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype, keep_fp32: frozenset[str]) -> torch.dtype:
    """diffusers' rule (`load_model_dict_into_meta`): fp32 if a keep-name is a component of the name."""
    if not tensor.is_floating_point():
        return tensor.dtype
    return torch.float32 if keep_fp32.intersection(name.split(".")) else dtype


def _load_file(module: nn.Module, unit: ReadUnit, target: _Target, place: Placer) -> None:
    with safe_open(unit.path, framework="pt", device="cpu") as f:
        for info, slot in unit.items:
            stored = f.get_tensor(info.name)  # a view of safetensors' private mmap of the file
            if target.quantized is not None and target.quantized.fill(slot.names[0], stored, target.device):
                continue
            dtype = target_dtype(slot.names[0], stored, target.dtype, target.keep_fp32)
            tensor = place(stored, target.device, dtype)
            del stored
            assign(module, slot, tensor)


def assign(module: nn.Module, slot: Slot, tensor: torch.Tensor) -> None:
    """Put `tensor` in place under every name of `slot` (one Parameter object for tied names)."""
    value = tensor if slot.is_buffer else nn.Parameter(tensor, requires_grad=False)
    for name in slot.names:
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        table = owner._buffers if slot.is_buffer else owner._parameters
        table[leaf] = value


def _finish(module: nn.Module, device: torch.device, index: CheckpointIndex) -> None:
    """Move `__init__`-built buffers to the device (computed dtype kept); check nothing is left on meta."""
    for sub in module.modules():
        for name, buf in sub._buffers.items():
            if buf is not None and buf.device != device and not buf.is_meta:
                sub._buffers[name] = buf.to(device)
    leftover = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{index.root}: tensor {leftover[0]!r} was never loaded (still on meta)")
    module.eval().requires_grad_(False)
