"""Several shard readers at once: the load plan cut into units of contiguous tensors, read by a thread pool.

Threads, not processes: the work is page faults on a mapped file and tensor copies or casts, and torch
releases the GIL for both, so two readers keep two cores (or two outstanding disk reads) busy while the
Python between tensors stays small. A unit is a run of tensors of one file in data order (sequential
reads within a unit); a large shard is cut into several units so that one big file (a VAE, a single
`model.safetensors`) is not read by one thread while the others idle.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

Item = TypeVar("Item")

# Big enough that a unit's per-file open (an mmap and a header parse) is noise next to its bytes, small
# enough that a 32 MiB shard is shared between readers and a few units keep every reader busy to the end.
UNIT_BYTES = 16 * 2**20
# More readers than this only queue on the same disk and memory bandwidth (measured: bench/load.py).
MAX_READERS = 4


@dataclass(frozen=True)
class ReadUnit(Generic[Item]):
    """Tensors of one file, in data order, read together by one reader."""

    path: Path
    items: tuple[Item, ...]
    nbytes: int


def split_units(
    plan: dict[Path, list[Item]], nbytes: Callable[[Item], int], unit_bytes: int = UNIT_BYTES
) -> list[ReadUnit[Item]]:
    """Each file's items cut into runs of at most `unit_bytes` (a larger tensor is a unit of its own),
    largest units first so the pool does not end on one long read."""
    units: list[ReadUnit[Item]] = []
    for path, items in plan.items():
        run: list[Item] = []
        size = 0
        for item in items:
            if run and size + nbytes(item) > unit_bytes:
                units.append(ReadUnit(path, tuple(run), size))
                run, size = [], 0
            run.append(item)
            size += nbytes(item)
        if run:
            units.append(ReadUnit(path, tuple(run), size))
    return sorted(units, key=lambda u: -u.nbytes)


def default_readers(units: int) -> int:
    """One reader per core up to `MAX_READERS`, never more than there are units."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_READERS, cores, units))


def read_all(read: Callable[[ReadUnit[Item]], None], units: Iterable[ReadUnit[Item]], readers: int) -> None:
    """read(unit) for every unit on `readers` threads (inline for one); the first error is raised
    after the others finished, so no thread is still writing into the module when the caller sees it."""
    units = list(units)
    if readers <= 1:
        for unit in units:
            read(unit)
        return
    with ThreadPoolExecutor(readers, thread_name_prefix="shard-reader") as pool:
        futures = [pool.submit(read, unit) for unit in units]
    for future in futures:
        future.result()
