from collections.abc import Iterator

import pytest

from serve.engine.core import EngineCore
from serve.engine.executor import WorkerExecutor
from serve.worker.worker import WorkerArgs
from tests.engine.fake_runner import FACTORY


def make_core(model_dir: str, max_queue: int = 4, factory: str = FACTORY) -> EngineCore:
    return EngineCore(WorkerExecutor(WorkerArgs(model_dir, runner_factory=factory), start_timeout_s=30), max_queue)


@pytest.fixture
def core(tmp_path) -> Iterator[EngineCore]:
    """An engine whose worker process runs the fake runner (the real pipe, spawn and restart code)."""
    engine = make_core(str(tmp_path))
    engine.start()
    yield engine
    engine.stop()
