"""Command-line flags generated from the config tree: one flag per field, so an option is declared
once (its type, bounds, default and help live on the config field) and the CLI cannot drift.

A field's flag is `--` + its name with dashes, or the `flag` its `json_schema_extra` names
(`serve.frozen.flag`); help is its docstring; type and choices come from its annotation
(`Literal` -> choices, `tuple[X, ...]` -> a repeatable flag, `bool` -> `--x/--no-x`). Every
argparse default is None, meaning "not given": the model's own default applies, and only given
flags reach the config, by path (`("vae", "tile_sample_size")`).

A field whose command line is not one plain flag (several flags fused into one value, or a value
resolved at startup) has an `Adapter`; it is still declared once, on its config.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

FieldPath = tuple[str, ...]


@dataclass(frozen=True)
class Flag:
    """The flag of one leaf field of a config tree."""

    path: FieldPath
    """The field's path from the root config, e.g. ("vae", "tile_sample_size")."""
    name: str
    """The flag, e.g. `--vae-tile`."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """argparse keywords (type, choices, action, help, required)."""
    env: str | None = None
    """The environment variable of this setting when it is not the usual `REELSERVE_` + flag name
    (`serve.settings_file`): a name deployments already use (`REELSERVE_API_KEYS`)."""

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Adapter:
    """The command line of a field that is not one plain flag."""

    add: Callable[[argparse.ArgumentParser, Flag], None]
    """Adds the flag(s) that give the field (help from `Flag.kwargs["help"]`)."""
    value: Callable[[argparse.Namespace], Any]
    """The field's value from the parsed flags; None: not given."""
    label: str | None = None
    """How errors name the flags, when there are several (`--lora-high/--lora-low`)."""


def flags(model: type[BaseModel], prefix: FieldPath = ()) -> Iterator[Flag]:
    """One `Flag` per leaf field of `model` and of the sub-configs it nests."""
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        sub = _sub_config(info.annotation)
        if sub is not None and "flag" not in extra:
            yield from flags(sub, path)
            continue
        cli = {k: v for k, v in extra.items() if k not in ("flag", "env")}
        flag = str(extra.get("flag") or "--" + name.replace("_", "-"))
        yield Flag(path, flag, {"help": _help(info).replace(f" (`{flag}`)", ""), **cli}, extra.get("env"))


def add_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    adapters: dict[FieldPath, Adapter] | None = None,
    only: Iterable[FieldPath] | None = None,
) -> list[Flag]:
    """Add the flags of `model`'s fields (those under the `only` paths, when given) to `parser`."""
    adapters = adapters or {}
    chosen = [f for f in flags(model) if only is None or any(f.path[: len(p)] == p for p in only)]
    groups: dict[str, Any] = {}  # one --help section per sub-config, titled with its docstring
    for f in chosen:
        target = parser
        if len(f.path) > 1:
            if f.path[0] not in groups:
                groups[f.path[0]] = parser.add_argument_group(f.path[0], model.model_fields[f.path[0]].description)
            target = groups[f.path[0]]
        if f.path in adapters:
            adapters[f.path].add(target, f)
        else:
            target.add_argument(f.name, dest=f.dest, **_argparse_kwargs(f, model))
    return chosen


def given_values(
    args: argparse.Namespace, chosen: list[Flag], adapters: dict[FieldPath, Adapter] | None = None
) -> dict[str, Any]:
    """The given flags as a nested dict for `Model.model_validate` (flags not given are left out)."""
    adapters = adapters or {}
    tree: dict[str, Any] = {}
    for f in chosen:
        value = adapters[f.path].value(args) if f.path in adapters else getattr(args, f.dest, None)
        if value is None:
            continue
        node = tree
        for key in f.path[:-1]:
            node = node.setdefault(key, {})
        node[f.path[-1]] = value
    return tree


def flag_label(loc: tuple, model: type[BaseModel], adapters: dict[FieldPath, Adapter] | None = None) -> str | None:
    """The flag that sets the field at a pydantic error's `loc`, or None when it is not one field
    (a check across fields). List indices in `loc` are dropped: `("quant", "skip", 0)` -> `--quant-skip`."""
    path = tuple(str(x) for x in loc if not isinstance(x, int))
    for f in flags(model):
        if path[: len(f.path)] == f.path:
            adapter = (adapters or {}).get(f.path)
            return (adapter.label if adapter else None) or f.name
    return None


def _argparse_kwargs(f: Flag, model: type[BaseModel]) -> dict[str, Any]:
    info = _field(model, f.path)
    kind = _without_none(info.annotation)
    kwargs: dict[str, Any] = {"default": None}
    if typing.get_origin(kind) is tuple:
        item, *rest = typing.get_args(kind)
        if rest != [Ellipsis]:
            raise TypeError(f"{'.'.join(f.path)}: {kind} has no plain flag; give it an Adapter")
        kwargs["action"], kind = "append", item
    if typing.get_origin(kind) is Literal:
        kwargs["choices"] = list(typing.get_args(kind))
    elif kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind in (int, float, str, Path):
        kwargs["type"] = kind
    else:
        raise TypeError(f"{'.'.join(f.path)}: {kind} has no plain flag; give it an Adapter")
    if info.is_required():
        kwargs = {"required": True, **{k: v for k, v in kwargs.items() if k != "default"}}
    return kwargs | f.kwargs


def _field(model: type[BaseModel], path: FieldPath) -> FieldInfo:
    for name in path[:-1]:
        model = typing.cast(type[BaseModel], _sub_config(model.model_fields[name].annotation))
    return model.model_fields[path[-1]]


def _help(info: FieldInfo) -> str:
    text = " ".join((info.description or "").split()).replace("%", "%%")
    default = info.get_default(call_default_factory=True)
    if info.is_required() or default in (None, ()):
        return text
    return f"{text} (default: {default})"


def _sub_config(annotation: Any) -> type[BaseModel] | None:
    kind = _without_none(annotation)
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _without_none(annotation: Any) -> Any:
    """`X | None` -> X (a None default is how a field says "not set")."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation
