"""What the API talks to: enqueue a request, await its MP4. No model code runs in this process's
event loop, nor in a thread pool of it: the EngineCore thread and the worker process do the work."""

from __future__ import annotations

import asyncio

from serve.config import ServerConfig
from serve.engine.core import (
    EngineCore,
    EngineError,
    EngineUnavailable,
    GenerationFailed,
    GenerationResult,
    QueueFull,
)
from serve.engine.executor import WorkerExecutor
from serve.engine.request import GenerationParams
from serve.worker.worker import DEFAULT_RUNNER_FACTORY, WorkerArgs

__all__ = [
    "EngineClient",
    "EngineError",
    "EngineUnavailable",
    "GenerationFailed",
    "GenerationResult",
    "QueueFull",
]


class EngineClient:
    """Owns one EngineCore (one worker). `start()` blocks until the model is loaded."""

    def __init__(self, config: ServerConfig, runner_factory: str = DEFAULT_RUNNER_FACTORY) -> None:
        args = WorkerArgs(str(config.model_dir), config.device, config.dtype, runner_factory)
        self.core = EngineCore(WorkerExecutor(args, config.worker_start_timeout_s), config.max_queue)

    def start(self) -> None:
        self.core.start()

    def stop(self) -> None:
        self.core.stop()

    async def generate(self, params: GenerationParams) -> GenerationResult:
        """Raises QueueFull or EngineUnavailable at once, GenerationFailed when the worker fails it.

        Cancelling the awaiting task (client disconnect) drops the request if it has not started.
        """
        _, future = self.core.add_request(params)
        return await asyncio.wrap_future(future)

    def is_healthy(self) -> bool:
        return self.core.is_healthy()

    def health_reason(self) -> str | None:
        return self.core.health_reason()

    @property
    def worker_pid(self) -> int | None:
        return self.core.executor.worker_pid
