"""The worker process: owns the model, answers a few verbs over a pipe.

Protocol (tuples, so they pickle cheaply and need no shared class versions):

    parent -> worker   ("execute", request_id, GenerationParams) | ("shutdown",)
    worker -> parent   ("ready", info) | ("load_failed", reason)
                       ("progress", request_id, step, total)
                       ("done", request_id, mp4_bytes, timings) | ("failed", request_id, reason)

The MP4 is encoded here so only bytes cross the process boundary, never frames or latents.
Nothing in this module imports torch at module level: the parent imports it to name the spawn
target, and the API process stays torch-free.
"""

from __future__ import annotations

import importlib
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from serve.engine.request import GenerationParams
from serve.pipeline.mp4 import encode_mp4

log = logging.getLogger(__name__)

DEFAULT_RUNNER_FACTORY = "serve.worker.worker:load_model_runner"


@dataclass(frozen=True)
class WorkerArgs:
    """What a worker needs to build its runner; pickled into the spawned process."""

    model_dir: str
    device: str = "cpu"
    dtype: str = "float32"
    runner_factory: str = DEFAULT_RUNNER_FACTORY
    """`module:function` called as f(model_dir, device, dtype) -> runner; tests name a fake."""


def load_model_runner(model_dir: str, device: str, dtype: str) -> Any:
    """The production factory: the real ModelRunner, torch imported only here."""
    import torch

    from serve.worker.model_runner import ModelRunner

    return ModelRunner.from_checkpoint(model_dir, device=device, dtype=getattr(torch, dtype))


def import_object(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def check_frames(frames: Any, params: GenerationParams) -> None:
    """A runner bug must fail its request, not reach the client as a wrong-sized video."""
    expected = (params.num_frames, params.height, params.width, 3)
    if tuple(frames.shape) != expected or str(frames.dtype) != "uint8":
        raise RuntimeError(f"runner returned {frames.dtype} frames {tuple(frames.shape)}, expected uint8 {expected}")


class Worker:
    def __init__(self, conn: Connection, args: WorkerArgs) -> None:
        self.conn = conn
        self.args = args
        self.runner: Any = None
        self.running = True

    def load(self) -> bool:
        try:
            factory = import_object(self.args.runner_factory)
            self.runner = factory(self.args.model_dir, self.args.device, self.args.dtype)
        except Exception as e:  # any load error must reach the parent as a message, not a silent exit
            log.error("worker failed to load the model:\n%s", traceback.format_exc())
            self.conn.send(("load_failed", f"{type(e).__name__}: {e}"))
            return False
        self.conn.send(("ready", {"device": self.args.device, "dtype": self.args.dtype}))
        return True

    def execute(self, request_id: str, params: GenerationParams) -> None:
        def on_step(step: int, total: int) -> None:
            self.conn.send(("progress", request_id, step, total))

        try:
            output = self.runner.generate(params, on_step=on_step)
            check_frames(output.frames, params)
            start = time.perf_counter()
            mp4 = encode_mp4(output.frames, params.fps, params.lossless)
            timings = {**output.timings, "mp4": time.perf_counter() - start}
        except Exception as e:  # one bad request fails alone; the worker keeps serving
            log.error("request %s failed:\n%s", request_id, traceback.format_exc())
            self.conn.send(("failed", request_id, f"{type(e).__name__}: {e}"))
            return
        self.conn.send(("done", request_id, mp4, timings))

    def shutdown(self) -> None:
        self.running = False

    def serve(self) -> None:
        verbs: dict[str, Callable[..., None]] = {"execute": self.execute, "shutdown": self.shutdown}
        while self.running:
            try:
                verb, *args = self.conn.recv()
            except (EOFError, OSError):  # the parent is gone: nobody is left to answer
                return
            verbs[verb](*args)


def worker_main(conn: Connection, args: WorkerArgs) -> None:
    """Entry point of the spawned process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    worker = Worker(conn, args)
    if worker.load():
        worker.serve()
    conn.close()
