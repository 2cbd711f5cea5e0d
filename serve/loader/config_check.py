"""A component's config.json checked against its safetensors headers before its module is built.

Building a module allocates what its config asks for, one parameter at a time on the host, so
`num_layers: 100000` in a config ran for minutes and took gigabytes before the per-tensor checks
of `plan_load` could say that the weights do not match. The config is checked first, in numbers
only (nothing is allocated):

1. per class (`serve.loader.wan_configs`), the fields people edit or mix up: the repeated-block
   counts against the block indices the headers hold, and the dims against a few key tensors;
   the message names config.json and the field;
2. the module built on the meta device (no memory; its size is bounded by step 1): every tensor
   the headers also hold must have their shape;
3. what the headers lack is bounded: no missing tensor larger than the largest stored one, and the
   parameter bytes the config implies at most twice the index's `metadata.total_size`.
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import torch
from torch import nn

from serve.loader.build import ComponentClass, initializers_skipped, read_component_config, tied
from serve.loader.errors import CheckpointError
from serve.loader.index import DTYPE_BYTES, CheckpointIndex, TensorInfo
from serve.loader.wan_configs import RULES, BlockCount, Fields, KeyTensor

FIX = "config.json and the weights belong to different models; restore config.json from the download of the weights"
# Tensors the headers lack are left to plan_load's "missing" message unless they are big enough
# to matter while building: more values than this and than the largest tensor stored.
MISSING_FLOOR = 2**20


def open_component(component_dir: str | Path) -> tuple[ComponentClass, dict, CheckpointIndex]:
    """A component's class, config and index, checked against each other: what every module build starts from."""
    return open_components([component_dir])[0]


def open_components(component_dirs: list) -> list[tuple[ComponentClass, dict, CheckpointIndex]]:
    """`open_component` of several: the field checks of all of them come before any meta build, so
    a bad transformer_2 is named before the model library is imported for the good transformer."""
    opened = []
    for root in map(Path, component_dirs):
        component, config = read_component_config(root)
        index = CheckpointIndex.from_dir(root)
        check_fields(component, config, root / "config.json", index)
        opened.append((component, config, index))
    for component, config, index in opened:
        check_built(component, config, index.root / "config.json", index)
    return opened


def check_fields(component: ComponentClass, config: dict, path: Path, index: CheckpointIndex) -> None:
    """Step 1: the class's rules (block counts, key tensor shapes); raises naming `path` and the field."""
    rules = RULES[component.name](Fields(config, path, lambda: _defaults(component, path)))
    for count in rules.counts:
        _check_count(count, index, path)
    for key in rules.tensors:
        _check_key_tensor(key, index, path, component.name)


def check_built(component: ComponentClass, config: dict, path: Path, index: CheckpointIndex) -> None:
    """Steps 2 and 3, on the module built on meta: stored shapes, and the size of what is not stored."""
    cls = component.load()
    tensors = _unique_tensors(_build_on_meta(component, cls, config, path))
    missing = _check_stored_shapes(tensors, index, cls.__name__)
    _check_missing(tensors, missing, index, path, cls.__name__)


def shape_mismatch(info: TensorInfo, class_name: str, expected: tuple[int, ...]) -> CheckpointError:
    return CheckpointError(
        f"tensor {info.name!r} in {info.file} has shape {list(info.shape)}, but {class_name} built from "
        f"config.json expects {list(expected)}; the weights and config.json belong to different models"
    )


def _defaults(component: ComponentClass, path: Path) -> dict:
    """The values the library gives the fields a config omits."""
    cls = component.load()
    if component.library == "transformers":
        try:
            return cls.config_class().to_dict()
        except Exception as exc:  # the library's own validation, whatever it raises
            raise CheckpointError(f"{path}: cannot read the defaults of {cls.config_class.__name__} ({exc})") from None
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not p.empty}


def _check_count(count: BlockCount, index: CheckpointIndex, path: Path) -> None:
    pattern = re.compile(re.escape(count.prefix) + r"(\d+)\.")
    found = sorted({int(m.group(1)) for name in index.tensors if (m := pattern.match(name))})
    if len(found) != count.expected:
        held = f"{len(found)} ({count.prefix}{found[0]} to {count.prefix}{found[-1]})" if found else "none"
        raise CheckpointError(f"{path}: {count.field}, but the weights in {index.source} hold {held}; {FIX}")


def _check_key_tensor(key: KeyTensor, index: CheckpointIndex, path: Path, class_name: str) -> None:
    info = next((index.tensors[n] for n in key.names if n in index.tensors), None)
    if info is None:
        if key.wanted_by:
            raise CheckpointError(f"{path}: {key.wanted_by}, but {index.source} holds no {key.names[0]!r}; {FIX}")
        return  # an incomplete checkpoint: plan_load names what is missing
    expected = tuple(d.size for d in key.dims)
    if info.shape == expected:
        return
    differ = [d for i, d in enumerate(key.dims) if i >= len(info.shape) or info.shape[i] != d.size]
    field = next((d.field for d in differ if d.field), None) or next((d.field for d in key.dims if d.field), "")
    raise CheckpointError(
        f"{path}: {field}, but tensor {info.name!r} in {info.file} has shape {list(info.shape)} where "
        f"{class_name} built from this config has {list(expected)}; {FIX}"
    )


def _build_on_meta(component: ComponentClass, cls: type[nn.Module], config: dict, path: Path) -> nn.Module:
    """The module with every parameter and buffer on meta: shapes without memory, in well under a second."""
    try:
        with torch.device("meta"), initializers_skipped(component.library):
            if component.library == "transformers":
                return tied(cls(cls.config_class.from_dict(config)))
            return cls.from_config(config)
    except Exception as exc:  # a field combination the class rejects or trips over (an index past a list)
        why = f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"{path}: {cls.__name__} cannot be built from it ({why}); {FIX}") from None


def _unique_tensors(module: nn.Module) -> list[tuple[list[str], tuple[int, ...]]]:
    """Each parameter and persistent buffer once, with all its names (tied weights have two)."""
    by_id: dict[int, tuple[list[str], tuple[int, ...]]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        by_id.setdefault(id(tensor), ([], tuple(tensor.shape)))[0].append(name)
    return list(by_id.values())


def _check_stored_shapes(tensors: list, index: CheckpointIndex, class_name: str) -> list[tuple[str, tuple[int, ...]]]:
    """Check each tensor the headers hold against the module; return (name, shape) of those they lack."""
    missing = []
    for names, shape in tensors:
        stored = [index.tensors[n] for n in names if n in index.tensors]
        for info in stored:
            if info.shape != shape:
                raise shape_mismatch(info, class_name, shape)
        if not stored:
            missing.append((names[0], shape))
    return missing


def _check_missing(tensors: list, missing: list, index: CheckpointIndex, path: Path, class_name: str) -> None:
    """Refuse a config whose tensors absent from the checkpoint would cost more to build than the
    checkpoint holds; smaller gaps are left to plan_load, which names each missing tensor."""
    largest = max((math.prod(i.shape) for i in index.tensors.values()), default=0)
    for name, shape in missing:
        if math.prod(shape) > max(largest, MISSING_FLOOR):
            raise CheckpointError(
                f"{path}: {class_name} built from it has {name!r} of shape {list(shape)}, which {index.source} "
                f"does not hold and which is larger than any tensor it does ({largest:,} values); {FIX}"
            )
    params = sum(math.prod(shape) for _, shape in tensors)
    dtype = min((i.dtype for i in index.tensors.values()), key=lambda d: DTYPE_BYTES.get(d, 0.5), default="U8")
    implied = params * DTYPE_BYTES.get(dtype, 0.5)  # sub-byte tags (4-bit formats) count half a byte
    declared = index.total_size if index.total_size is not None else index.tensor_bytes()
    if implied > 2 * declared + MISSING_FLOOR:
        said = "says metadata.total_size is" if index.total_size is not None else "holds"
        names = ", ".join(repr(n) for n, _ in missing[:3])
        raise CheckpointError(
            f"{path}: {class_name} built from it has {params:,} parameters, at least {implied / 1e9:.2f} GB as "
            f"{dtype}, but {index.source} {said} {declared / 1e9:.2f} GB ({len(missing)} of its tensors are not there, "
            f"e.g. {names}); {FIX}"
        )
