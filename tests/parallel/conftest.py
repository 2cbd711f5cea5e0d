"""Worker groups on CPU: real spawned ranks (gloo), the real runner on tiny checkpoints.

Every rank gets one torch thread (the machine has two cores for up to four ranks); requests are
small (64x64 or 48x48, 9 frames, a few steps) and each engine is started once per module.
"""

import tempfile

from serve.engine.core import EngineCore
from serve.engine.executor import Executor
from serve.engine.request import GenerationParams
from serve.engine.scheduler import Scheduler, SchedulerConfig
from serve.jobs.artifacts import ArtifactTarget
from serve.worker.factory import RunnerConfig, WorkerArgs
from serve.worker.group_args import GroupArgs
from tests.requests import tokens

TIMEOUT_S = 300  # guards hangs only: four ranks share two cores


def group_core(
    model_dir: str, groups: list[tuple[int, int] | None], options: RunnerConfig | None = None, **scheduler
) -> EngineCore:
    """An engine whose worker i is a group of ulysses x cfg CPU ranks (`groups[i]`), or one
    process (None); MP4s go to a fresh directory, never into `model_dir`."""
    outputs = {"scratch": ArtifactTarget(tempfile.mkdtemp(prefix="reelserve-test-outputs-"))}
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
