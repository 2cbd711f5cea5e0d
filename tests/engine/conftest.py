import tempfile
from collections.abc import Iterator

import pytest

from serve.engine.core import EngineCore
from serve.engine.executor import Executor
from serve.engine.scheduler import Scheduler, SchedulerConfig
from serve.jobs.artifacts import ArtifactTarget
from serve.worker.factory import RunnerConfig, WorkerArgs
from tests.engine.fake_runner import FACTORY
from tests.requests import tokens


def make_core(
    model_dir: str, factory: str = FACTORY, workers: int = 1, options: RunnerConfig | None = None, **scheduler
) -> EngineCore:
    """MP4s land in a fresh directory of their own, never in `model_dir` (some tests pass the
    session's shared tiny checkpoint, which other tests compare byte for byte)."""
    outputs = {"scratch": ArtifactTarget(tempfile.mkdtemp(prefix="reelserve-test-outputs-"))}
    args = [
        WorkerArgs(
            model_dir,
            runner_factory=factory,
            options=options or RunnerConfig(),
            calibrate=False,
            outputs=tuple(outputs.items()),
        )
        for _ in range(workers)
    ]
    stores = {name: target.open() for name, target in outputs.items()}
    scheduler_ = Scheduler(SchedulerConfig(**scheduler), workers, tokens)
    return EngineCore(Executor(args, start_timeout_s=30), scheduler_, stores)


@pytest.fixture
def core(tmp_path) -> Iterator[EngineCore]:
    """An engine whose worker process runs the fake runner (the real pipe, spawn and restart code).
    One request on the worker at a time, so the tests can see a waiting queue."""
    engine = make_core(str(tmp_path), max_queue=4, max_running_per_worker=1)
    engine.start()
    yield engine
    engine.stop()
