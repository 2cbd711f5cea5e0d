"""The `ArtifactStore` protocol (finished MP4s, uploaded conditioning images) and its local
directory implementation. The worker process writes a video straight into the store and reports
its key; the API streams it back. S3-compatible storage is `serve/jobs/s3.py`.

A write is all or nothing: the bytes go to a partial file first and appear under their key only
when complete, so a full disk or a killed worker leaves no half video behind.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

CHUNK = 1 << 20  # bytes per read when streaming a video back
PARTIAL = ".partial"  # directory of unfinished writes, under the root
# How a request's error starts when its video could not be stored (the job runner then checks the
# store and reports the server not ready while it stays unwritable).
STORAGE_FAILED = "could not store the video"


class ArtifactStoreError(Exception):
    """A write or read failed; the message names the store and the cause (no host path)."""


@runtime_checkable
class ArtifactStore(Protocol):
    location: str
    """What operators call it in messages: `s3://bucket/prefix` or the directory."""

    def writing(self, key: str) -> contextlib.AbstractContextManager[Path]:
        """Worker side: a local path to write the artifact to; it is stored under `key` when the
        block ends cleanly and discarded when it raises."""

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def get_bytes(self, key: str) -> bytes | None: ...

    def stream(self, key: str) -> Iterator[bytes] | None:
        """The artifact's bytes in chunks, or None if it is not there."""

    def size(self, key: str) -> int | None: ...

    def url(self, key: str, ttl_s: int) -> str | None:
        """A presigned download URL, where the store has them (S3); None otherwise."""

    def delete(self, key: str) -> None:
        """Remove it; a missing key is not an error (retention and deletes may race)."""

    def check(self) -> None:
        """Raise ArtifactStoreError unless an artifact can be written and removed now."""


@dataclass(frozen=True)
class ArtifactTarget:
    """How a worker process opens the same store (picklable: the store's clients are not)."""

    spec: str
    """A directory, or `s3://bucket/prefix`."""
    s3_endpoint_url: str | None = None

    def open(self) -> ArtifactStore:
        if self.spec.startswith("s3://"):
            from serve.jobs.s3 import S3ArtifactStore

            return S3ArtifactStore.from_url(self.spec, self.s3_endpoint_url)
        return LocalArtifactStore(Path(self.spec))


class LocalArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.location = str(self.root)

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:  # keys are ours, but never leave the root
            raise ValueError(f"artifact key {key!r} leaves the store")
        return path

    @contextlib.contextmanager
    def writing(self, key: str) -> Iterator[Path]:
        final = self.path(key)
        partial = self.root / PARTIAL / f"{uuid.uuid4().hex}{final.suffix}"
        try:
            partial.parent.mkdir(parents=True, exist_ok=True)
            yield partial
            final.parent.mkdir(parents=True, exist_ok=True)
            _fsync(partial)
            os.replace(partial, final)
        except OSError as e:
            raise ArtifactStoreError(f"could not write to the output directory: {e.strerror or e}") from e
        finally:
            partial.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        with self.writing(key) as path:
            path.write_bytes(data)

    def get_bytes(self, key: str) -> bytes | None:
        with _as_store_error("read"):
            try:
                return self.path(key).read_bytes()
            except FileNotFoundError:
                return None

    def stream(self, key: str) -> Iterator[bytes] | None:
        with _as_store_error("read"):
            try:
                handle = self.path(key).open("rb")
            except FileNotFoundError:
                return None
        return _chunks(handle)

    def size(self, key: str) -> int | None:
        with _as_store_error("read"):
            try:
                return self.path(key).stat().st_size
            except FileNotFoundError:
                return None

    def url(self, key: str, ttl_s: int) -> str | None:
        return None

    def delete(self, key: str) -> None:
        with _as_store_error("delete from"):
            self.path(key).unlink(missing_ok=True)

    def sweep_partial(self) -> int:
        """Remove unfinished writes a killed process left behind (at start, when this process
        owns the directory). Returns how many."""
        partial = self.root / PARTIAL
        leftovers = [p for p in partial.iterdir() if p.is_file()] if partial.is_dir() else []
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.put_bytes(f"{PARTIAL}-probe", b"reelserve write probe")
            self.delete(f"{PARTIAL}-probe")
        except (OSError, ArtifactStoreError) as e:
            raise ArtifactStoreError(f"output directory {self.root} is not writable: {_cause(e)}") from e


@contextlib.contextmanager
def _as_store_error(verb: str) -> Iterator[None]:
    """OS errors (read-only, permission, I/O) as ArtifactStoreError, which callers handle."""
    try:
        yield
    except OSError as e:
        raise ArtifactStoreError(f"could not {verb} the output directory: {e.strerror or e}") from e


def cause_of(error: BaseException) -> str:
    """What went wrong, without where: an OS error's text ("No space left on device") or the
    error's class. Clients see this; the log has the whole message with paths and endpoints."""
    cause = error.__cause__ or error
    return getattr(cause, "strerror", None) or type(cause).__name__


def _chunks(handle) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def _fsync(path: Path) -> None:
    """Flush before the rename, so a crash cannot leave a complete-looking empty file."""
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


def _cause(e: BaseException) -> str:
    cause = e.__cause__ if isinstance(e, ArtifactStoreError) and e.__cause__ else e
    return getattr(cause, "strerror", None) or str(cause)
