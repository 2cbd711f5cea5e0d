"""A multipart/form-data body as a request dict: the text parts the official `openai` client sends.

The client posts `videos.create` as a form (`input_reference` may be a file) and merges `extra_body`
into it with its query-string encoder: scalars become text (`"8"`, `"true"`), and nested values
become bracketed keys, `loras=[{"name": "a", "scale": 0.5}]` becoming the parts
`loras[][name]=a` and `loras[][scale]=0.5` (grouped by key, not by item; captured in
tests/api/test_extension_fields.py). Three shapes are taken for a structured field:

    loras=[{"name": "a", "scale": 0.5}]     one part holding JSON (what the README recommends)
    loras[][name]=a  loras[][scale]=0.5     the client's own flattening of a list of objects
    loras[0][name]=a loras[0][scale]=0.5    indexed keys (other form encoders)
    input_reference[image_url]=data:...     an object's fields

The client's `[]` form loses which value belongs to which item when only some items have a key
(a scale on one LoRA of two): that is refused, naming the fix, rather than guessed.
"""

from __future__ import annotations

import re
import types
import typing
from collections import defaultdict
from collections.abc import Iterable

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel

# `name[a][b]`: the field, then one or more bracketed keys (empty: "the next item of a list").
_BRACKETED = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])+)")
_KEY = re.compile(r"\[([^\[\]]*)\]")
# A list index: ASCII digits, few enough for int() (str.isdigit() also takes "²", which int() refuses).
_INDEX = re.compile(r"[0-9]{1,4}")
JSON_EXAMPLE = '[{"name": "style", "scale": 0.8}]'


def form_fields(parts: Iterable[tuple[str, str]], model: type[BaseModel]) -> dict[str, object]:
    """The text parts of a form, in order, as the dict `model` validates (values stay text; the
    caller validates them in lax mode). 422s name the field."""
    plain: dict[str, str] = {}
    bracketed: dict[str, list[tuple[list[str], str]]] = defaultdict(list)
    for key, value in parts:
        if match := _BRACKETED.fullmatch(key):
            bracketed[match[1]].append((_KEY.findall(match[2]), value))
        elif key in plain:
            raise field_error((key,), f"{key} is given more than once")
        else:
            plain[key] = value
    data: dict[str, object] = {}
    structured = structured_fields(model)
    for name, value in plain.items():
        if name in bracketed:
            raise field_error((name,), f"{name} is given both as one part and as {name}[...] parts; send one")
        data[name] = _json_part(name, value) if name in structured and value.lstrip()[:1] in ("[", "{") else value
    for name, items in bracketed.items():
        data[name] = _unflatten(name, items)
    return data


def structured_fields(model: type[BaseModel]) -> set[str]:
    """Fields that hold a list or an object (in any branch of a union)."""
    return {name for name, info in model.model_fields.items() if _is_structured(info.annotation)}


def _is_structured(annotation: object) -> bool:
    if typing.get_origin(annotation) in (list, tuple, dict):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_structured(arg) for arg in typing.get_args(annotation))
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _json_part(name: str, text: str) -> object:
    from serve.api.routes import parse_json  # NaN and over-long numbers kept as text, so the 422 names them

    try:
        return parse_json(text.encode())
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise field_error((name,), f"{name} is not valid JSON ({e}); send e.g. {JSON_EXAMPLE}") from None


def _unflatten(name: str, items: list[tuple[list[str], str]]) -> object:
    first = items[0][0][0]
    if any(len(keys) > 2 for keys, _ in items):
        raise field_error((name,), f"{name} is nested too deep for form keys; send {name} as one JSON part")
    if first == "":
        return _bracket_list(name, items)
    if _is_index(first):
        return _indexed_list(name, items)
    return _object(name, items)


def _bracket_list(name: str, items: list[tuple[list[str], str]]) -> list:
    """`x[]=1 x[]=2` -> ["1", "2"]; `x[][a]=1 x[][b]=2 x[][a]=3 x[][b]=4` -> [{a: 1, b: 2}, {a: 3, b: 4}]."""
    if any(keys[0] != "" for keys, _ in items):
        raise field_error((name,), f"{name}[] and {name}[key] parts are mixed; send {name} as one JSON part")
    if all(len(keys) == 1 for keys, _ in items):
        return [value for _, value in items]
    if any(len(keys) == 1 for keys, _ in items):
        raise field_error((name,), f"{name}[] and {name}[][key] parts are mixed; send {name} as one JSON part")
    columns: dict[str, list[str]] = defaultdict(list)
    for keys, value in items:
        columns[keys[1]].append(value)
    counts = {key: len(values) for key, values in columns.items()}
    if len(set(counts.values())) > 1:
        message = (
            f"{name}: the parts {', '.join(f'{name}[][{k}] x{n}' for k, n in counts.items())} do not say which value "
            f"belongs to which item (the openai client groups them by key); give every item the same keys "
            f"(e.g. a scale on each), or send {name} as one JSON part: extra_body={{{name!r}: json.dumps(...)}}"
        )
        raise field_error((name,), message)
    size = next(iter(counts.values()))
    return [{key: values[i] for key, values in columns.items()} for i in range(size)]


def _indexed_list(name: str, items: list[tuple[list[str], str]]) -> list:
    """`x[0][a]=1 x[1][a]=2` -> [{a: 1}, {a: 2}]; `x[0]=1 x[1]=2` -> ["1", "2"]."""
    if any(not _is_index(keys[0]) for keys, _ in items):
        raise field_error((name,), f"{name}[N] and {name}[key] parts are mixed; send {name} as one JSON part")
    entries: dict[int, object] = {}
    for keys, value in items:
        index = int(keys[0])
        if len(keys) == 1:
            if index in entries:
                raise field_error((name, index), f"{name}[{index}] is given more than once")
            entries[index] = value
            continue
        entry = entries.setdefault(index, {})
        if not isinstance(entry, dict) or keys[1] in entry:
            raise field_error((name, index), f"{name}[{index}][{keys[1]}] is given more than once")
        entry[keys[1]] = value
    if sorted(entries) != list(range(len(entries))):
        raise field_error((name,), f"{name}: the indexes {sorted(entries)} are not 0, 1, 2, ... without gaps")
    return [entries[i] for i in range(len(entries))]


def _object(name: str, items: list[tuple[list[str], str]]) -> dict:
    """`x[a]=1 x[b]=2` -> {a: 1, b: 2}."""
    fields: dict[str, str] = {}
    for keys, value in items:
        if len(keys) > 1 or keys[0] == "" or keys[0][:1].isdigit():
            raise field_error((name,), f"{name}: its parts mix [key] with other forms; send {name} as one JSON part")
        if keys[0] in fields:
            raise field_error((name, keys[0]), f"{name}[{keys[0]}] is given more than once")
        fields[keys[0]] = value
    return fields


def _is_index(key: str) -> bool:
    return _INDEX.fullmatch(key) is not None


def field_error(loc: tuple, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("body", *loc), "msg": message, "input": None}])
