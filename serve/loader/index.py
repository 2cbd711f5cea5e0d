"""Where each tensor of a component lives, read from safetensors headers only (no weights).

A safetensors file is an 8-byte little-endian header length, a JSON header
(`name -> {dtype, shape, data_offsets}`), then the raw bytes. We parse the header ourselves
before handing the file to `safe_open`: it costs one small read, and it lets us name the exact
tensor whose bytes are cut off in a truncated download instead of failing somewhere inside Rust.
`CheckpointIndex` is also what `reelserve inspect` reads shapes and dtypes from.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from serve.loader.errors import CheckpointError

INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
SINGLE_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Bytes per element by safetensors dtype tag; tags not listed (sub-byte formats) skip the size check.
DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}  # fmt: skip

REDOWNLOAD = "the file is damaged or incomplete; re-download it"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its file's header describes it; `begin`/`end` are offsets into the data area."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _invalid(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a valid safetensors file ({why}); {REDOWNLOAD}")


def _read_raw_header(path: Path) -> tuple[dict, int]:
    """Return the parsed JSON header and the size of the data area that follows it."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _invalid(path, f"{size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise _invalid(path, f"header length {header_len} exceeds the file size {size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _invalid(path, f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _invalid(path, "header is not a JSON object")
    return header, size - 8 - header_len


def _tensor_info(path: Path, name: str, entry: object, data_size: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        valid = isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end))
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid or begin > end:
        raise _invalid(path, f"malformed header entry for tensor {name!r}")
    if end > data_size:
        raise CheckpointError(
            f"{path} is truncated: tensor {name!r} needs data bytes {begin}..{end} "
            f"but the file holds only {data_size} bytes of data; {REDOWNLOAD}"
        )
    itemsize = DTYPE_BYTES.get(dtype)
    if itemsize is not None and math.prod(shape) * itemsize != end - begin:
        raise _invalid(path, f"tensor {name!r} has shape {list(shape)} {dtype} but {end - begin} bytes")
    return TensorInfo(name, dtype, shape, path, begin, end)


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Validated header of one safetensors file: tensor name -> `TensorInfo`, no weights read."""
    path = Path(path)
    header, data_size = _read_raw_header(path)
    header.pop("__metadata__", None)
    return {name: _tensor_info(path, name, entry, data_size) for name, entry in header.items()}


@dataclass(frozen=True)
class CheckpointIndex:
    """Every tensor of one component directory: name -> `TensorInfo` (which carries its file).

    `source` is the `*.index.json` for sharded weights, or the single `.safetensors` file.
    """

    root: Path
    source: Path
    tensors: dict[str, TensorInfo]

    @classmethod
    def from_dir(cls, component_dir: str | Path) -> CheckpointIndex:
        root = Path(component_dir)
        for name in INDEX_NAMES:
            if (root / name).is_file():
                return cls(root, root / name, _tensors_from_index(root / name))
        for name in SINGLE_NAMES:
            if (root / name).is_file():
                return cls(root, root / name, read_header(root / name))
        raise _no_weights_error(root)

    def by_file(self) -> dict[Path, list[TensorInfo]]:
        """Tensors grouped per file, files in name order, tensors in data order (sequential reads)."""
        files: dict[Path, list[TensorInfo]] = {}
        for info in sorted(self.tensors.values(), key=lambda i: (i.file.name, i.begin)):
            files.setdefault(info.file, []).append(info)
        return files


def _no_weights_error(root: Path) -> CheckpointError:
    pickles = sorted(p.name for p in root.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        # Pickle files can run arbitrary code when loaded; we never open them.
        return CheckpointError(
            f"{root} holds only pickle weights ({', '.join(pickles)}); reelserve reads safetensors only. "
            "Convert them (e.g. load with the original library and save_pretrained(safe_serialization=True))."
        )
    expected = " or ".join(INDEX_NAMES + SINGLE_NAMES)
    return CheckpointError(f"{root} has no weights: expected {expected}")


def _read_weight_map(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid index (no weight_map: {exc}); {REDOWNLOAD}") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: 'weight_map' is not an object; {REDOWNLOAD}")
    return weight_map


def _tensors_from_index(index_path: Path) -> dict[str, TensorInfo]:
    """Read every shard's header and check that the index and the shards agree tensor by tensor."""
    weight_map = _read_weight_map(index_path)
    shards: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        shards.setdefault(shard, []).append(tensor)
    tensors: dict[str, TensorInfo] = {}
    for shard, listed in sorted(shards.items()):
        path = index_path.parent / shard
        if not path.is_file():
            raise CheckpointError(
                f"shard {path} named in {index_path} does not exist (it should hold tensor {listed[0]!r} "
                f"and {len(listed) - 1} more); {REDOWNLOAD}"
            )
        header = read_header(path)
        _check_shard_matches_index(index_path, path, listed, header, weight_map)
        tensors.update(header)
    return tensors


def _check_shard_matches_index(
    index_path: Path, path: Path, listed: list[str], header: dict[str, TensorInfo], weight_map: dict[str, str]
) -> None:
    for tensor in listed:
        if tensor not in header:
            raise CheckpointError(
                f"tensor {tensor!r} is missing: {index_path} places it in {path}, which does not contain it; "
                f"{REDOWNLOAD}"
            )
    for tensor in header:
        if weight_map.get(tensor) != path.name:
            elsewhere = weight_map.get(tensor)
            where = f"the index places it in {elsewhere}" if elsewhere else "the index does not list it"
            raise CheckpointError(
                f"tensor {tensor!r} in {path} disagrees with {index_path} ({where}); a tensor must be "
                f"stored exactly once; {REDOWNLOAD}"
            )
