"""Live servers on loopback: uvicorn in a thread of the test process, on a port the OS picks."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from serve.api.app import create_app
from serve.config import Limits, ServerConfig
from serve.engine.client import EngineClient
from serve.engine.config import SchedulerConfig
from tests.engine.fake_runner import FACTORY

START_TIMEOUT_S = 120


class LiveServer:
    """Runs `app` (lifespan included, so the engine and its worker process start) until closed."""

    def __init__(self, app: FastAPI, **uvicorn_options) -> None:
        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **uvicorn_options))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start; see the log above")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()

    @property
    def engine(self) -> EngineClient:
        return self.app.state.engine

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


@pytest.fixture(scope="session")
def real_server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    """The production app and worker (real ModelRunner) on the tiny checkpoint."""
    with LiveServer(create_app(ServerConfig(model_dir=tiny_model_dir))) as server:
        yield server


def fake_server(model_dir: Path, **config) -> LiveServer:
    """The production app and worker process, with the fake runner in the worker."""
    cfg = ServerConfig(model_dir=model_dir, **config)
    return LiveServer(create_app(cfg, EngineClient(cfg, runner_factory=FACTORY)))


@pytest.fixture(scope="module")
def small_limits_server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    limits = Limits(max_height=48, max_num_frames=17, max_prompt_chars=20)
    with fake_server(tiny_model_dir, limits=limits, scheduler=SchedulerConfig(max_queue=1)) as server:
        yield server
