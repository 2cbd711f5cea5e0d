"""Where each tensor of a component lives, read from safetensors headers only (no weights).

A safetensors file is an 8-byte little-endian header length, a JSON header
(`name -> {dtype, shape, data_offsets}`), then the raw bytes. We parse the header ourselves
before handing the file to `safe_open`: it costs one small read, and it lets us name the exact
tensor whose bytes are cut off in a truncated download instead of failing somewhere inside Rust.
`CheckpointIndex` is also what `reelserve inspect` reads shapes and dtypes from.

Every length a file declares is checked before it is trusted: a header length beyond the
format's own limit (or the file) is refused before a byte of it is read, since reading what a
damaged or hostile 8-byte prefix asks for is how a 1 GiB "header" became 2.4 GB of RSS.
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

# safetensors' own limit (MAX_HEADER_SIZE in its Rust source): no file it writes or reads has a
# longer header, so a longer length is damage, and we refuse it before reading.
MAX_HEADER_BYTES = 100_000_000
# The JSON files beside the weights (config.json, the index) get the same bound: an index lists
# the same names as the headers, a config is a few KB.
MAX_JSON_BYTES = MAX_HEADER_BYTES
# How far an index's metadata.total_size may be from the bytes its shards' headers hold. diffusers
# and transformers write the exact sum; a shard with one tensor dropped or re-typed is a few percent
# off and gets the loader's message naming that tensor, while an index from another download (or
# a hand-edited one) is off by far more than a tenth.
TOTAL_SIZE_TOLERANCE = 0.1


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


def read_json_file(path: Path, what: str) -> object:
    """A JSON file of a checkpoint, refused unread when larger than `MAX_JSON_BYTES`."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(
            f"{path} is {size:,} bytes, over the {MAX_JSON_BYTES:,}-byte limit for {what}; {REDOWNLOAD}"
        )
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); {REDOWNLOAD}") from None


def _header_length(path: Path, prefix: bytes, size: int) -> int:
    """The header length the 8-byte prefix declares, checked against the format's limit and the file."""
    if len(prefix) < 8:
        raise _invalid(path, f"{size} bytes, shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES:
        raise _invalid(
            path, f"its header length is {header_len:,} bytes, over the safetensors limit of {MAX_HEADER_BYTES:,}"
        )
    if header_len > size - 8:
        raise _invalid(path, f"header length {header_len} exceeds the file size {size}")
    return header_len


def _read_raw_header(path: Path) -> tuple[dict, int]:
    """Return the parsed JSON header and the size of the data area that follows it."""
    size = path.stat().st_size
    with path.open("rb") as f:
        header_len = _header_length(path, f.read(8), size)
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
    total_size: int | None = None
    """The index's `metadata.total_size` (checked against the headers); None without an index or the field."""

    @classmethod
    def from_dir(cls, component_dir: str | Path) -> CheckpointIndex:
        root = Path(component_dir)
        for name in INDEX_NAMES:
            if (root / name).is_file():
                weight_map, total_size = _read_index(root / name)
                tensors = _tensors_from_index(root / name, weight_map)
                _check_total_size(root / name, total_size, tensors)
                return cls(root, root / name, tensors, total_size)
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

    def tensor_bytes(self) -> int:
        """Bytes of tensor data the headers declare (what `metadata.total_size` counts)."""
        return sum(info.nbytes for info in self.tensors.values())


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


def _read_index(index_path: Path) -> tuple[dict[str, str], int | None]:
    """The index's weight map and its `metadata.total_size` (None when absent)."""
    index = read_json_file(index_path, "an index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path} is not a valid index (no 'weight_map' object); {REDOWNLOAD}")
    metadata = index.get("metadata") or {}
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    # Some transformers versions wrote a float here (bool tensors counted as 1/8 byte).
    if total is not None and (type(total) not in (int, float) or not 0 <= total < math.inf):
        raise CheckpointError(f"{index_path}: metadata.total_size is {total!r}, not a byte count; {REDOWNLOAD}")
    return weight_map, None if total is None else int(total)


def _check_total_size(index_path: Path, total: int | None, tensors: dict[str, TensorInfo]) -> None:
    """The index's declared byte total against what its shards' headers hold: an index from another
    download (or edited by hand) is refused here, before anything is sized from it."""
    held = sum(info.nbytes for info in tensors.values())
    if total is not None and abs(total - held) > held * TOTAL_SIZE_TOLERANCE:
        raise CheckpointError(
            f"{index_path}: metadata.total_size is {total:,} bytes, but the headers of the shards it lists "
            f"hold {held:,} bytes of tensors; the index does not belong to these shards; {REDOWNLOAD}"
        )


def _tensors_from_index(index_path: Path, weight_map: dict[str, str]) -> dict[str, TensorInfo]:
    """Read every shard's header and check that the index and the shards agree tensor by tensor."""
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
