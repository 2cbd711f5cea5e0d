"""What the API talks to: enqueue a request, await its MP4, cancel it, read its state.

No model code runs in this process's event loop, nor in a thread pool of it: the EngineCore
thread and the worker processes do the work.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import Future
from pathlib import Path

from models.registry import resolve
from serve.config import ServerConfig
from serve.engine.core import (
    EngineCore,
    EngineError,
    EngineUnavailable,
    GenerationFailed,
    GenerationResult,
    QueueFull,
)
from serve.engine.executor import Executor
from serve.engine.request import GenerationParams
from serve.engine.scheduler import Scheduler
from serve.worker.factory import DEFAULT_RUNNER_FACTORY, RunnerConfig, WorkerArgs

__all__ = [
    "EngineClient",
    "EngineError",
    "EngineUnavailable",
    "GenerationFailed",
    "GenerationResult",
    "QueueFull",
]


def runner_config(config: ServerConfig) -> RunnerConfig:
    """The worker's part of the config: its sub-configs as they are, and the largest request to plan for."""
    limits = config.limits
    return RunnerConfig(
        quant=config.quant,
        lora=config.lora,
        sampling=config.sampling,
        vae=config.vae,
        memory=config.memory,
        largest_request=(limits.max_height, limits.max_width, limits.max_num_frames),
    )


def quant_key(options: RunnerConfig) -> str:
    """The server-wide quantization in the batch key (one policy per server)."""
    quant = options.quant_text()
    return "none" if quant is None else f"{quant};skip={','.join(options.quant.skip)}"


class EngineClient:
    """Owns one EngineCore and its workers. `start()` blocks until every worker has loaded."""

    def __init__(self, config: ServerConfig, runner_factory: str = DEFAULT_RUNNER_FACTORY) -> None:
        devices = config.workers.worker_devices()
        cpu_workers = sum(d == "cpu" for d in devices)
        threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers > 1 else 0
        options = runner_config(config)
        model, dtype = str(config.model_dir), config.workers.dtype
        workers = [
            WorkerArgs(model, device, dtype, runner_factory, options=options, torch_threads=threads)
            for device in devices
        ]
        spec = resolve(config.model_dir).spec  # torch-free: the model's token count for the cost model
        scheduler = Scheduler(
            config.scheduler,
            len(workers),
            spec.tokens,
            model=Path(config.model_dir).name,
            quantization=quant_key(options),
        )
        executor = Executor(workers, config.workers.start_timeout_s)
        self.core = EngineCore(executor, scheduler, config.scheduler.request_timeout_s)

    def start(self) -> None:
        self.core.start()

    def stop(self) -> None:
        self.core.stop()

    def submit(self, params: GenerationParams) -> tuple[str, Future[GenerationResult]]:
        """Enqueue and return at once (the job API); raises QueueFull or EngineUnavailable."""
        return self.core.add_request(params)

    async def generate(self, params: GenerationParams) -> GenerationResult:
        """Raises QueueFull or EngineUnavailable at once, GenerationFailed when the request fails.

        Cancelling the awaiting task (client disconnect) cancels the request at the next step.
        """
        _, future = self.core.add_request(params)
        return await asyncio.wrap_future(future)

    def cancel(self, request_id: str) -> bool:
        return self.core.abort(request_id)

    def request_state(self, request_id: str) -> dict | None:
        return self.core.request_state(request_id)

    def is_healthy(self) -> bool:
        return self.core.is_healthy()

    def is_ready(self) -> bool:
        return self.core.ready.is_set() and self.core.is_healthy()

    def health_reason(self) -> str | None:
        return self.core.health_reason()

    def metrics(self) -> bytes:
        return self.core.render_metrics()

    @property
    def worker_pids(self) -> list[int | None]:
        return [None if w.proc is None else w.proc.pid for w in self.core.executor.workers]

    @property
    def worker_pid(self) -> int | None:
        return self.worker_pids[0]
