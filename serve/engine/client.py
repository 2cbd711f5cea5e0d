"""What the API talks to: enqueue a request, await its MP4, cancel it, read its state.

No model code runs in this process's event loop, nor in a thread pool of it: the EngineCore
thread and the worker processes do the work.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from models.registry import resolve
from serve.config import ServerConfig
from serve.engine.core import (
    DuplicateRequest,
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
from serve.jobs.artifacts import ArtifactStore, ArtifactTarget
from serve.worker.factory import DEFAULT_RUNNER_FACTORY, RunnerConfig, WorkerArgs
from serve.worker.group_args import logical_workers

__all__ = [
    "DuplicateRequest",
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
        text=config.text,
        largest_request=(limits.max_height, limits.max_width, limits.max_num_frames),
    )


def quant_key(options: RunnerConfig) -> str:
    """The server-wide quantization in the batch key (one policy per server)."""
    quant = options.quant_text()
    return "none" if quant is None else f"{quant};skip={','.join(options.quant.skip)}"


SCRATCH, ARTIFACTS = "scratch", "artifacts"


@dataclass(frozen=True)
class Outputs:
    """Where this server keeps things: the output directory (the embedded job store's SQLite file,
    scratch space) and the artifact stores the workers write MP4s to, by name: `scratch` (this
    host's disk: `POST /generate` answers with the file and deletes it) and `artifacts` (job
    videos and uploaded images: the output directory, or S3)."""

    root: Path
    targets: dict[str, ArtifactTarget]

    @classmethod
    def of(cls, config: ServerConfig) -> Outputs:
        root = config.output_dir or Path(tempfile.mkdtemp(prefix="reelserve-"))
        artifacts = config.jobs.artifacts or str(root)
        targets = {
            SCRATCH: ArtifactTarget(str(root / "scratch")),
            ARTIFACTS: ArtifactTarget(artifacts, config.jobs.s3_endpoint_url),
        }
        return cls(root, targets)

    def open(self) -> dict[str, ArtifactStore]:
        return {name: target.open() for name, target in self.targets.items()}


class EngineClient:
    """Owns one EngineCore and its workers. `start()` blocks until every worker has loaded."""

    def __init__(
        self, config: ServerConfig, runner_factory: str = DEFAULT_RUNNER_FACTORY, outputs: Outputs | None = None
    ) -> None:
        self.outputs = outputs or Outputs.of(config)
        devices = config.workers.worker_devices()
        cpu_workers = sum(d == "cpu" for d in devices)
        threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers > 1 else 0
        options = runner_config(config)
        model, dtype = str(config.model_dir), config.workers.dtype
        workers = [
            WorkerArgs(
                model,
                device,
                dtype,
                runner_factory,
                options=options,
                torch_threads=threads,
                outputs=tuple(self.outputs.targets.items()),
                log_format=config.log_format,
                log_level=config.log_level,
            )
            for device in devices
        ]
        workers, groups = logical_workers(workers, config.workers)  # a group of ranks is one worker
        spec = resolve(config.model_dir).spec  # torch-free: the model's token count for the cost model
        scheduler = Scheduler(
            config.scheduler,
            len(workers),
            spec.tokens,
            model=Path(config.model_dir).name,
            quantization=quant_key(options),
        )
        executor = Executor(workers, config.workers.start_timeout_s, groups)
        self.stores = self.outputs.open()
        self.core = EngineCore(
            executor, scheduler, self.stores, config.scheduler.request_timeout_s, model_name=config.model_names[0]
        )

    def start(self) -> None:
        self.core.start()

    def stop(self) -> None:
        self.core.stop()

    def submit(self, params: GenerationParams, job_id: str) -> Future[GenerationResult]:
        """Run a job (its MP4 goes to the artifact store) and return at once; raises QueueFull or
        EngineUnavailable."""
        return self.core.add_request(params, request_id=job_id, output=ARTIFACTS)[1]

    async def generate(self, params: GenerationParams) -> GenerationResult:
        """Raises QueueFull or EngineUnavailable at once, GenerationFailed when the request fails.

        Cancelling the awaiting task (client disconnect) cancels the request at the next step.
        """
        return await asyncio.wrap_future(self.enqueue(params))

    def enqueue(self, params: GenerationParams) -> Future[GenerationResult]:
        """`generate`'s first half: queue the request now (raises QueueFull, EngineUnavailable);
        await `asyncio.wrap_future` of the result (cancelling that cancels the request)."""
        return self.core.add_request(params, output=SCRATCH)[1]

    def fail_all(self, reason: str) -> None:
        """Give up on everything queued or running (they get EngineUnavailable)."""
        self.core.fail_all(reason)

    def waiting_count(self) -> int:
        """Requests queued here and on no worker yet."""
        return self.core.waiting_count()

    def retry_after_s(self) -> int:
        return self.core.retry_after_s()

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
    def num_workers(self) -> int:
        return len(self.core.executor.workers)

    def is_idle(self) -> bool:
        """No request queued or running (a drain is over)."""
        return self.core.active_count() == 0

    @property
    def worker_pids(self) -> list[int | None]:
        return [None if w.proc is None else w.proc.pid for w in self.core.executor.workers]

    @property
    def worker_pid(self) -> int | None:
        return self.worker_pids[0]
