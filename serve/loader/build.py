"""Build a component's module from its `config.json` without allocating its weights.

Parameters go to the meta device; buffers stay real. That split matters: Wan's rope tables are
non-persistent buffers computed in `__init__` and absent from the checkpoint, so building under
`torch.device("meta")` would leave them as meta tensors with nothing to fill them from.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from serve.loader.errors import CheckpointError
from serve.loader.index import read_json_file


@dataclass(frozen=True)
class ComponentClass:
    """An allowed module class and the library that defines it ("diffusers" or "transformers")."""

    library: str
    name: str

    def load(self) -> type[nn.Module]:
        return getattr(importlib.import_module(self.library), self.name)


# An allow-list: config.json chooses among these only, so a checkpoint cannot make us import
# arbitrary classes.
ALLOWED = {
    c.name: c
    for c in (
        ComponentClass("diffusers", "WanTransformer3DModel"),
        ComponentClass("diffusers", "AutoencoderKLWan"),
        ComponentClass("transformers", "UMT5EncoderModel"),
    )
}


def read_component_config(component_dir: Path) -> tuple[ComponentClass, dict]:
    """The component's class (from the allow-list) and its raw config dict."""
    path = component_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: a component directory needs the config.json written by save_pretrained; "
            "point at the component folder (e.g. <model>/transformer) or re-download the model"
        )
    config = read_json_file(path, "a config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object; re-download it")
    return _component_class(path, config), config


def _component_class(path: Path, config: dict) -> ComponentClass:
    # diffusers writes `_class_name`; transformers writes `architectures: [name]` instead.
    name = config.get("_class_name") or next(iter(config.get("architectures") or []), None)
    if name not in ALLOWED:
        raise CheckpointError(
            f"{path}: class {name!r} is not supported; the loader builds only {', '.join(sorted(ALLOWED))}. "
            "Check that this is the right component folder, or add the class to serve.loader.build.ALLOWED"
        )
    return ALLOWED[name]


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Register every new parameter on the meta device; buffers are left where they are built.

    Patches `nn.Module.register_parameter` for the duration (the technique of accelerate's
    `init_empty_weights(include_buffers=False)`, kept here because accelerate is only a test
    dependency). Not thread-safe: build one component at a time per process.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        # Already-meta parameters are re-registrations (transformers ties embeddings by assigning
        # one Parameter under a second name); wrapping them again would silently untie them.
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


@contextmanager
def initializers_skipped(library: str = "diffusers") -> Iterator[None]:
    """Weight initialisation does nothing for the duration: the library's own switch, as its
    `from_pretrained` uses it (diffusers' `no_init_weights` stubs `torch.nn.init`; transformers' also
    stubs `PreTrainedModel.init_weights`, whose `_init_weights` calls `normal_` through its own module).
    A loaded module's every parameter is then filled from the file (`plan_load` checks it), so random
    initialisation is dead work, and on meta tensors it is not free: each `normal_` runs through
    Python decompositions (measured: 0.06 s of a 0.3 s bench-size load; UMT5's alone 10 ms)."""
    if library == "transformers":
        from transformers.initialization import no_init_weights
    else:
        from diffusers.models.modeling_utils import no_init_weights

    with no_init_weights():
        yield


def on_host() -> contextlib.AbstractContextManager:
    """Tensors built in `__init__` on the CPU. `with torch.device(...)` is a TorchFunctionMode that sends
    every torch call through Python (measured: half of a bench-size build), so it is entered only when
    something (`torch.set_default_device`) made another device the default."""
    return contextlib.nullcontext() if torch.get_default_device().type == "cpu" else torch.device("cpu")


def build_empty(component: ComponentClass, config: dict) -> nn.Module:
    """The module with meta parameters and real (CPU) buffers."""
    cls = component.load()
    with parameters_on_meta(), initializers_skipped(component.library), on_host():
        if component.library == "transformers":
            return tied(cls(cls.config_class.from_dict(config)))
        return cls.from_config(config)


def tied(model: nn.Module) -> nn.Module:
    """A transformers model with its weights tied: `init_weights` ties them, and transformers'
    `no_init_weights` skips `init_weights` whole, so its `from_pretrained` ties after building, as here."""
    model.tie_weights(recompute_mapping=False)
    return model
