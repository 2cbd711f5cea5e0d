"""Artifacts in S3-compatible storage (AWS S3, SeaweedFS, MinIO, ...) through boto3.

Objects live at `s3://BUCKET/PREFIX/<key>`. Credentials come from boto3's standard chain (the
AWS_* environment variables, ~/.aws, an instance role); nothing here reads or logs them.

A write is all or nothing, as the local store's: the worker writes to a temporary local file
and it is uploaded when the block ends cleanly (an object appears whole or not at all), and the
temporary file is removed either way.

The boto3 client is made on first use in each process (and again after a fork): clients do not
cross process boundaries, so what workers receive is `ArtifactTarget`, which opens this store.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from serve.jobs.artifacts import CHUNK, ArtifactStoreError

MISSING = {"404", "NoSuchKey", "NotFound"}  # error codes of an absent object (HEAD has no body, so "404")
NO_BUCKET = {"NoSuchBucket"}


class S3ArtifactStore:
    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.location = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client: Any = None
        self._client_pid: int | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, endpoint_url: str | None = None) -> S3ArtifactStore:
        """`s3://BUCKET` or `s3://BUCKET/PREFIX`."""
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"artifact store {url!r}: expected s3://BUCKET/PREFIX")
        return cls(parsed.netloc, parsed.path, endpoint_url)

    def __getstate__(self) -> dict:
        return {"bucket": self.bucket, "prefix": self.prefix, "endpoint_url": self.endpoint_url}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["bucket"], state["prefix"], state["endpoint_url"])

    # ---- the protocol ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self, key: str) -> Iterator[Path]:
        scratch = Path(tempfile.mkdtemp(prefix="reelserve-upload-"))
        try:
            path = scratch / f"artifact{Path(key).suffix}"
            yield path
            with self._failing(f"could not upload {key}"):
                self.client.upload_file(str(path), self.bucket, self._key(key))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._failing(f"could not store {key}"):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes | None:
        body = self._body(key)
        if body is None:
            return None
        with self._failing(f"could not read {key}"), contextlib.closing(body):
            return body.read()

    def stream(self, key: str) -> Iterator[bytes] | None:
        # The GET is made now, so a missing object is None here rather than an error mid-response.
        body = self._body(key)
        return None if body is None else self._chunks(key, body)

    def size(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        with self._failing(f"could not look up {key}"):
            try:
                return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
            except ClientError as e:
                if _code(e) in MISSING:
                    return None
                raise

    def url(self, key: str, ttl_s: int) -> str | None:
        with self._failing(f"could not sign a URL for {key}"):
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=int(ttl_s)
            )

    def delete(self, key: str) -> None:
        with self._failing(f"could not delete {key}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))  # absent: S3 answers 204 too

    def check(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if _code(e) in MISSING | NO_BUCKET:
                raise ArtifactStoreError(
                    f"artifact store {self.location}: bucket {self.bucket!r} does not exist; create it "
                    f"(e.g. `aws s3 mb s3://{self.bucket}{self._endpoint_flag()}`)"
                ) from e
            raise ArtifactStoreError(f"artifact store {self.location} is not usable: {_cause(e)}") from e
        except Exception as e:
            raise ArtifactStoreError(f"artifact store {self.location} is not reachable: {_cause(e)}") from e
        probe = f".reelserve-probe-{uuid.uuid4().hex}"
        try:
            self.put_bytes(probe, b"reelserve write probe")
            self.delete(probe)
        except ArtifactStoreError as e:
            raise ArtifactStoreError(f"artifact store {self.location} is not writable: {_cause(e)}") from e

    # ---- plumbing -------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """This process's boto3 client (low-level clients are thread-safe; sessions are not)."""
        with self._lock:
            if self._client is None or self._client_pid != os.getpid():
                self._client = self._make_client()
                self._client_pid = os.getpid()
            return self._client

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            # S3-compatible servers are usually addressed by path (no bucket DNS names); AWS by host.
            s3={"addressing_style": "path" if self.endpoint_url else "auto"},
        )
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _body(self, key: str) -> Any:
        """The streaming body of the object, or None if there is none."""
        from botocore.exceptions import ClientError

        with self._failing(f"could not read {key}"):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            except ClientError as e:
                if _code(e) in MISSING:
                    return None
                raise

    def _chunks(self, key: str, body: Any) -> Iterator[bytes]:
        with self._failing(f"could not read {key}"), contextlib.closing(body):
            yield from body.iter_chunks(CHUNK)

    def _endpoint_flag(self) -> str:
        return f" --endpoint-url {self.endpoint_url}" if self.endpoint_url else ""

    @contextlib.contextmanager
    def _failing(self, what: str) -> Iterator[None]:
        """boto3's and the network's errors as ArtifactStoreError naming the store and the cause."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (ClientError, BotoCoreError, Boto3Error, OSError) as e:
            raise ArtifactStoreError(f"artifact store {self.location}: {what}: {_cause(e)}") from e


def _code(error: Exception) -> str:
    return str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))


def _cause(error: BaseException) -> str:
    """What went wrong, in a line: the S3 error code and message, or the exception's text."""
    if isinstance(error, ArtifactStoreError) and error.__cause__ is not None:
        error = error.__cause__
    response = getattr(error, "response", None)
    if isinstance(response, dict) and "Error" in response:
        details = response["Error"]
        return f"{details.get('Code', '?')}: {details.get('Message', '')}".rstrip(": ")
    return f"{type(error).__name__}: {error}"
