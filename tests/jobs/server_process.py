"""reelserve as its own process, the way users run it (`reelserve serve ...`), with the fake runner
in its worker so a video takes a fraction of a second: what these tests exercise is the process
around the model (signals, restarts, the stores), not the model.

    python -m tests.jobs.server_process serve --model DIR --port N [any reelserve serve flag]
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
# Generous: a guard against hangs only (worker spawn + imports on a loaded 2-core machine).
START_TIMEOUT_S = 300
EXIT_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One `reelserve serve` process on loopback; `start()` waits until `/ready` answers 200."""

    def __init__(self, model_dir: Path, *flags: str, env: dict[str, str] | None = None, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "tests.jobs.server_process", "serve", "--model", str(model_dir)]
        self.argv += ["--port", str(self.port), *flags]
        self.env = {**os.environ, **(env or {})}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        out = self.log.open("ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} at start; see {self.log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready within {START_TIMEOUT_S} s; see {self.log}")
            time.sleep(0.2)
        return self

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the server and its worker processes (a crashed host leaves no orphan either)."""
        for pid in _children(self.proc.pid):
            os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(EXIT_TIMEOUT_S)

    def wait(self) -> int:
        return self.proc.wait(EXIT_TIMEOUT_S)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def main(argv: list[str]) -> int:
    """`reelserve` itself (serve.cli.main: its flags, its one-line errors, its exit codes), with
    the fake runner as the engine's runner factory."""
    import functools

    from serve.api import server
    from serve.cli import main as reelserve
    from tests.engine.fake_runner import FACTORY

    server.EngineClient = functools.partial(server.EngineClient, runner_factory=FACTORY)
    return reelserve(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
