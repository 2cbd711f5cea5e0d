"""`reelserve serve`: run the app under uvicorn."""

from __future__ import annotations

import uvicorn

from serve.api.app import create_app
from serve.config import ServerConfig
from serve.engine.client import EngineClient
from serve.engine.executor import WorkerStartError


class ServerStartError(RuntimeError):
    """The model could not be loaded; the message names the file and the fix."""


def run_server(config: ServerConfig) -> None:
    """Serve until SIGINT/SIGTERM. One uvicorn process: the engine and its worker live in it, so
    several uvicorn workers would load the model several times."""
    client = EngineClient(config)
    try:
        # Load before binding the port: a broken checkpoint is one clear line, not a lifespan traceback.
        client.start()
    except WorkerStartError as e:
        client.stop()
        raise ServerStartError(str(e)) from e
    uvicorn.run(create_app(config, client), host=config.host, port=config.port, log_level="info")
