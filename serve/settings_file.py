"""`reelserve serve`'s settings from outside its command line: a YAML file (`--config FILE`) and
`REELSERVE_*` environment variables. Precedence, as in vLLM and uvicorn: command line > environment
> file > the config tree's defaults.

Generic over the parser, so every option of `serve` has all three forms without a line per option:
a flag `--max-queue 4` is `max-queue: 4` in the file (`max_queue` reads the same; no nesting) and
`REELSERVE_MAX_QUEUE=4` in the environment, unless its field names another variable
(`flag(..., env="REELSERVE_API_KEYS")`, a name deployments already use). A value is read as the
flag's own: same type and choices; a repeatable flag takes a YAML list, or in the environment a
comma-separated or JSON list; a `--x/--no-x` switch takes true/false. The layers merge per flag,
before the flags' adapters run and before the config validates, so bounds are checked once and
an error names where the bad value came from (`serve.yaml: port`, `REELSERVE_PORT`).
"""

from __future__ import annotations

import argparse
import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "REELSERVE_"
CONFIG_ENV = "REELSERVE_CONFIG"  # the file itself, for platforms that configure by environment
NOT_SETTINGS = {"help", "config"}  # argparse dests that are not settings
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """A bad config file or environment variable; the message names it, the key and the fix."""


@dataclass(frozen=True)
class Option:
    """One option of the parser as the file and the environment name it."""

    key: str
    """The file's key: the flag without its dashes (`max-queue`)."""
    env: str
    """The environment variable (`REELSERVE_MAX_QUEUE`)."""
    action: argparse.Action

    @property
    def flag(self) -> str:
        return self.action.option_strings[0]


@dataclass(frozen=True)
class Layered:
    """The parsed flags with the file's and environment's values filled in where no flag was given."""

    args: argparse.Namespace
    sources: dict[str, str]
    """Flag -> where its value came from, for values that did not come from the command line."""
    warnings: tuple[str, ...] = ()


def options(actions: Iterable[argparse.Action], env_names: Mapping[str, str] | None = None) -> dict[str, Option]:
    """The settings of a parser's option actions, by file key; `env_names`: dest -> a variable
    that replaces the usual name."""
    found = {}
    for action in actions:
        long = [s for s in action.option_strings if s.startswith("--")]
        if not long or action.dest in NOT_SETTINGS:
            continue
        key = long[0].removeprefix("--")
        env = (env_names or {}).get(action.dest) or ENV_PREFIX + key.upper().replace("-", "_")
        found[key] = Option(key, env, action)
    return found


def layer(
    args: argparse.Namespace, settings: dict[str, Option], environ: Mapping[str, str], file: Path | None
) -> Layered:
    """`args` with every option not given on the command line taken from the environment, else
    from `file`. Raises SettingsError naming the file or variable."""
    from_file = read_file(file, settings) if file is not None else {}
    from_env, warnings = read_environment(environ, settings)
    merged, sources = argparse.Namespace(**vars(args)), {}
    for key, option in settings.items():
        if getattr(args, option.action.dest, None) is not None:
            continue  # the command line wins
        given = from_env.get(key) or from_file.get(key)
        if given is not None:
            setattr(merged, option.action.dest, given[0])
            sources[option.flag] = given[1]
    return Layered(merged, sources, warnings)


def read_file(path: Path, settings: dict[str, Option]) -> dict[str, tuple[Any, str]]:
    """The file's settings by key: each parsed as its flag's value, and where it is (`FILE: key`)."""
    raw = _load_yaml(path)
    values: dict[str, tuple[Any, str]] = {}
    for given, value in raw.items():
        key = str(given).removeprefix("--").replace("_", "-")
        if isinstance(value, dict):
            raise SettingsError(
                f"{path}: {given}: the file is flat, one key per flag; write the settings of this section "
                "at the top level under their flag names (e.g. max-queue: 4)"
            )
        if key not in settings:
            raise SettingsError(f"{path}: unknown key {given!r}; {_closest(key, settings)}")
        if key in values:
            raise SettingsError(f"{path}: {key!r} is given twice (with dashes and with underscores); keep one")
        if value is not None:  # `key:` with no value leaves the default, as if the key were absent
            source = f"{path}: {given}"
            values[key] = (parse_value(settings[key], value, source), source)
    return values


def read_environment(
    environ: Mapping[str, str], settings: dict[str, Option]
) -> tuple[dict[str, tuple[Any, str]], tuple[str, ...]]:
    """The environment's settings by key, with their variable (an empty variable counts as unset),
    and a warning for each `REELSERVE_*` variable close to a setting's but not one (a likely typo)."""
    by_env = {option.env: option for option in settings.values()}
    values = {}
    for name, option in by_env.items():
        if environ.get(name, "").strip():
            values[option.key] = (parse_value(option, environ[name], name), name)
    warnings = []
    for name in environ:
        if name.startswith(ENV_PREFIX) and name not in by_env and name != CONFIG_ENV:
            close = difflib.get_close_matches(name, list(by_env), n=1, cutoff=0.85)
            if close:
                warnings.append(f"{name} is not a setting and is ignored; did you mean {close[0]}?")
    return values, tuple(warnings)


def parse_value(option: Option, raw: Any, source: str) -> Any:
    """`raw` (a YAML value or an environment string) as the flag would have parsed it."""
    action = option.action
    if isinstance(action, argparse.BooleanOptionalAction):
        return _switch(raw, source)
    if isinstance(action, argparse._AppendAction):  # a repeatable flag: a list of its values
        return [_scalar(action, item, source) for item in _items(raw, source)]
    return _scalar(action, raw, source)


def _load_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise SettingsError(f"cannot read the config file {path}: {e.strerror or e}; check --config") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(e, "problem", None) or e
        raise SettingsError(f"{path}: not valid YAML{at}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: the file must be a mapping of flag names to values (e.g. port: 8000)")
    return raw


def _closest(key: str, settings: dict[str, Option]) -> str:
    close = difflib.get_close_matches(key, list(settings), n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "the keys are `reelserve serve --help`'s flags without the dashes"


def _switch(raw: Any, source: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in TRUE | FALSE:
        return raw.strip().lower() in TRUE
    raise SettingsError(f"{source}: {raw!r} is not a switch; use true or false")


def _items(raw: Any, source: str) -> list[Any]:
    """A YAML list (or one value), or an environment string: a JSON list, else comma-separated."""
    if isinstance(raw, list):
        return raw
    if isinstance(raw, str) and raw.lstrip().startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as e:
            raise SettingsError(f'{source}: not a JSON list ({e.msg}); write ["a", "b"] or a,b') from None
        if isinstance(items, list):
            return items
    if isinstance(raw, str):
        return [item.strip() for item in raw.split(",") if item.strip()]
    return [raw]


def _scalar(action: argparse.Action, raw: Any, source: str) -> Any:
    if isinstance(raw, dict | list):
        raise SettingsError(f"{source}: {raw!r} is not a single value; give {_kind(action)}")
    if isinstance(raw, bool):  # YAML reads yes/no/on/off as booleans: never a number or a name here
        raise SettingsError(f"{source}: {raw!r} is not {_kind(action)}; quote it if it is a name")
    text = raw if isinstance(raw, str) else str(raw)
    try:
        value = action.type(text) if callable(action.type) else text
    except (TypeError, ValueError):
        raise SettingsError(f"{source}: {raw!r} is not {_kind(action)}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise SettingsError(f"{source}: {value!r} is not one of {choices}")
    return value


def _kind(action: argparse.Action) -> str:
    names = {int: "an integer", float: "a number", Path: "a path", str: "a string"}
    return names.get(action.type, "a string")  # type: ignore[arg-type]
