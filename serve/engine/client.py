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
from serve.engine.scheduler import Scheduler, SchedulerConfig
from serve.worker.factory import DEFAULT_RUNNER_FACTORY, WEIGHTS_DTYPE_QUANT, RunnerOptions, WorkerArgs

__all__ = [
    "EngineClient",
    "EngineError",
    "EngineUnavailable",
    "GenerationFailed",
    "GenerationResult",
    "QueueFull",
]


def scheduler_config(config: ServerConfig) -> SchedulerConfig:
    return SchedulerConfig(
        max_queue=config.max_queue,
        max_batch_size=config.max_batch_size,
        max_batch_cost_s=config.max_batch_cost_s,
        max_running_per_worker=config.max_running_per_worker,
        expert_policy=config.expert_policy,
    )


def runner_options(config: ServerConfig) -> RunnerOptions:
    return RunnerOptions(
        quant=config.quant,
        quant_skip=config.quant_skip,
        lora_dirs=tuple(str(d) for d in config.lora_dirs),
        fused_loras=tuple((str(f), expert, scale) for f, expert, scale in config.fused_loras),
        per_request_loras=bool(config.lora_dirs),
        step_cache_threshold=config.step_cache_threshold,
        vae_tile=config.vae_tile,
        vae_tile_overlap=config.vae_tile_overlap,
        vae_chunk_frames=config.vae_chunk_frames,
        vae_workers=config.vae_workers,
        vae_order=config.vae_order,
        memory_mode=config.memory_mode,
        weights_dtype=config.weights_dtype,
        text_encoder_device=config.text_encoder_device,
        prefetch_blocks=config.prefetch_blocks,
        vram=config.vram,
        ram=config.ram,
        largest_request=(config.limits.max_height, config.limits.max_width, config.limits.max_num_frames),
    )


def quant_key(config: ServerConfig) -> str:
    """The server-wide quantization in the batch key (one policy per server)."""
    quant = config.quant or WEIGHTS_DTYPE_QUANT[config.weights_dtype]
    return "none" if quant is None else f"{quant};skip={','.join(config.quant_skip)}"


class EngineClient:
    """Owns one EngineCore and its workers. `start()` blocks until every worker has loaded."""

    def __init__(self, config: ServerConfig, runner_factory: str = DEFAULT_RUNNER_FACTORY) -> None:
        devices = config.worker_devices()
        cpu_workers = sum(d == "cpu" for d in devices)
        threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers > 1 else 0
        options = runner_options(config)
        workers = [
            WorkerArgs(
                str(config.model_dir), device, config.dtype, runner_factory, torch_threads=threads, options=options
            )
            for device in devices
        ]
        spec = resolve(config.model_dir).spec  # torch-free: the model's token count for the cost model
        scheduler = Scheduler(
            scheduler_config(config),
            len(workers),
            spec.tokens,
            model=Path(config.model_dir).name,
            quantization=quant_key(config),
        )
        self.core = EngineCore(Executor(workers, config.worker_start_timeout_s), scheduler, config.request_timeout_s)

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
