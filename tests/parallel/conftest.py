"""Worker groups on CPU: real spawned ranks (gloo), the real runner on tiny checkpoints.

Every rank gets one torch thread (the machine has two cores for up to four ranks); requests are
small (64x64 or 48x48, 9 frames, a few steps) and each engine is started once per module.
"""

import threading
from collections.abc import Callable

import numpy as np
import pytest

from serve.engine.core import EngineCore
from serve.engine.executor import Executor
from serve.engine.request import GenerationParams
from serve.engine.scheduler import Scheduler, SchedulerConfig
from serve.jobs.artifacts import ArtifactTarget
from serve.worker.factory import RunnerConfig, WorkerArgs
from serve.worker.group_args import GroupArgs
from tests.requests import tokens

TIMEOUT_S = 300  # guards hangs only: four ranks share two cores


@pytest.fixture(scope="module")
def outputs_dir(tmp_path_factory) -> str:
    """Where a module's engine writes its MP4s (pytest removes old ones), never the model's directory."""
    return str(tmp_path_factory.mktemp("outputs"))


def group_core(
    model_dir: str,
    groups: list[tuple[int, int] | None],
    outputs_dir: str,
    options: RunnerConfig | None = None,
    **scheduler,
) -> EngineCore:
    """An engine whose worker i is a group of ulysses x cfg CPU ranks (`groups[i]`), or one
    process (None); MP4s go to `outputs_dir`."""
    outputs = {"scratch": ArtifactTarget(outputs_dir)}
    args = WorkerArgs(
        model_dir, options=options or RunnerConfig(), calibrate=False, torch_threads=1, outputs=tuple(outputs.items())
    )
    group_args = [None if g is None else GroupArgs(("cpu",) * (g[0] * g[1]), g[0], g[1]) for g in groups]
    stores = {name: target.open() for name, target in outputs.items()}
    scheduler_ = Scheduler(SchedulerConfig(**scheduler), len(groups), tokens)
    executor = Executor([args] * len(groups), start_timeout_s=TIMEOUT_S, groups=group_args)
    return EngineCore(executor, scheduler_, stores)


def request(
    seed: int, height: int = 64, width: int = 64, steps: int = 3, prompt: str = "a red cat"
) -> GenerationParams:
    """A lossless request (its MP4 decodes to the engine's uint8 frames bit for bit), CFG on."""
    return GenerationParams(prompt, "blurry", height, width, 9, 16, steps, 4.0, 3.0, seed, "unipc", lossless=True)


def check_batch_at_different_steps(core: EngineCore, alone: Callable, levels: int) -> None:
    """Two requests batched at different steps each match their run alone within `levels` 8-bit
    levels. 10 steps: the first 3 or 4 run on the high-noise expert. The first request's second
    step is held at its submit until the second request is in, so the second is encoded while the
    first is at step 1 and joins it on that expert, whatever the timing."""
    from serve.pipeline.mp4 import decode_mp4

    first, second = request(seed=5, steps=10), request(seed=6, steps=10, prompt="a blue dog")
    first_id = f"batch-first-{id(alone)}"
    held, added, submits = threading.Event(), threading.Event(), []
    submit = core.executor.submit

    def holding_submit(unit, *args, **kwargs):
        if unit.kind == "denoise" and first_id in unit.request_ids:
            submits.append(unit)
            if len(submits) == 2:  # the first's second step: let the second request in first
                held.set()
                added.wait(TIMEOUT_S)
        return submit(unit, *args, **kwargs)

    core.executor.submit = holding_submit
    try:
        _, first_future = core.add_request(first, request_id=first_id)
        assert held.wait(TIMEOUT_S)
        _, second_future = core.add_request(second)
        added.set()
        results = {"first": first_future.result(TIMEOUT_S), "second": second_future.result(TIMEOUT_S)}
    finally:
        added.set()
        del core.executor.submit
    assert ("denoise", 0, 2) in results["second"].trace  # the two did share steps
    for name, p in (("first", first), ("second", second)):
        diff = np.abs(decode_mp4(results[name].mp4)[0].astype(int) - np.asarray(alone(p)).astype(int))
        assert diff.max() <= levels, name
