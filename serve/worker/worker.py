"""The worker process: owns the model and the latents of the requests it holds; answers a few verbs.

Protocol (tuples, so they pickle cheaply and need no shared class versions):

    parent -> worker   ("encode", unit_id, [(request_id, GenerationParams), ...])
                       ("denoise", unit_id, [request_id, ...], expert)
                       ("decode", unit_id, [request_id, ...])
                       ("free", [request_id, ...])
                       ("shutdown",)
    worker -> parent   ("ready", info) | ("load_failed", reason)
                       ("result", unit_id, UnitReport)

Latents never leave this process; a decode returns the finished MP4's bytes. Nothing here imports
torch at module level: the API process imports this module to name the spawn target.
"""

from __future__ import annotations

import importlib
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from serve.engine.request import GenerationParams
from serve.pipeline.mp4 import encode_mp4
from serve.worker.factory import WorkerArgs

log = logging.getLogger(__name__)


@dataclass
class UnitReport:
    """The outcome of one unit: per-request failures, and what the scheduler or client needs."""

    failed: dict[str, str] = field(default_factory=dict)
    experts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    mp4: dict[str, bytes] = field(default_factory=dict)
    mp4_s: float = 0.0
    elapsed_s: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)  # e.g. step-cache skips of the decoded requests


def import_object(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def check_frames(frames: Any, params: GenerationParams) -> None:
    """A runner bug must fail its request, not reach the client as a wrong-sized video."""
    expected = (params.num_frames, params.height, params.width, 3)
    if tuple(frames.shape) != expected or str(frames.dtype) != "uint8":
        raise RuntimeError(f"runner returned {frames.dtype} frames {tuple(frames.shape)}, expected uint8 {expected}")


def step_cache_counts(states: list[Any]) -> dict[str, int]:
    """Steps the first-block cache skipped and computed, summed over finished requests."""
    caches = [c for c in (getattr(s, "step_cache", None) for s in states) if c is not None]
    if not caches:
        return {}
    return {"skipped": sum(c.skipped for c in caches), "computed": sum(c.computed for c in caches)}


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


class Worker:
    def __init__(self, conn: Connection, args: WorkerArgs) -> None:
        self.conn = conn
        self.args = args
        self.runner: Any = None
        self.states: dict[str, Any] = {}  # request_id -> the runner's per-request state
        self.running = True

    def load(self) -> bool:
        try:
            factory = import_object(self.args.runner_factory)
            self.runner = factory(self.args.model_dir, self.args.device, self.args.dtype, self.args.options)
            samples = self._calibrate() if self.args.calibrate else []
        except Exception as e:  # any load error must reach the parent as a message, not a silent exit
            log.error("worker failed to load the model:\n%s", traceback.format_exc())
            self.conn.send(("load_failed", _reason(e)))
            return False
        self.conn.send(("ready", {"device": self.args.device, "dtype": self.args.dtype, "cost_samples": samples}))
        return True

    def _calibrate(self) -> list[tuple[int, int, float]]:
        calibrate = getattr(self.runner, "calibrate", None)
        return calibrate() if calibrate is not None else []

    # ---- verbs ----------------------------------------------------------------------------------

    def encode(self, items: list[tuple[str, GenerationParams]]) -> UnitReport:
        report = UnitReport()
        try:
            states = self.runner.start([params for _, params in items])
        except Exception as e:  # the batch's text encode failed: every request in it fails
            log.error("encode failed:\n%s", traceback.format_exc())
            report.failed = {rid: _reason(e) for rid, _ in items}
            return report
        for (rid, _), state in zip(items, states, strict=True):
            self.states[rid] = state
            report.experts[rid] = tuple(self.runner.experts_of(state))
        return report

    def denoise(self, request_ids: list[str], expert: int) -> UnitReport:
        report = UnitReport()
        try:
            self.runner.denoise_step([self.states[rid] for rid in request_ids], expert)
        except Exception as e:  # the batch shared one forward pass: all its requests fail
            log.error("denoise step failed:\n%s", traceback.format_exc())
            report.failed = {rid: _reason(e) for rid in request_ids}
            self.free(request_ids)
        return report

    def decode(self, request_ids: list[str]) -> UnitReport:
        """Decode requests of one shape together and return their MP4s (only bytes leave)."""
        report = UnitReport()
        states = [self.states.pop(rid) for rid in request_ids]
        report.counters = step_cache_counts(states)
        try:
            if hasattr(self.runner, "finish_mp4"):  # streams chunks into the encoders
                videos, timings = self.runner.finish_mp4(states)
                report.mp4, report.mp4_s = dict(zip(request_ids, videos, strict=True)), timings["mp4"]
            else:
                self._finish_then_encode(request_ids, states, report)
        except Exception as e:
            log.error("decode failed:\n%s", traceback.format_exc())
            report.failed = {rid: _reason(e) for rid in request_ids}
        return report

    def _finish_then_encode(self, request_ids: list[str], states: list[Any], report: UnitReport) -> None:
        """For runners that return whole uint8 videos: check each, then encode it."""
        for rid, state in zip(request_ids, states, strict=True):
            frames = self.runner.finish(state)
            check_frames(frames, state.params)
            start = time.perf_counter()
            report.mp4[rid] = encode_mp4(frames, state.params.fps, state.params.lossless)
            report.mp4_s += time.perf_counter() - start

    def free(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.states.pop(rid, None)

    def shutdown(self) -> None:
        self.running = False

    def serve(self) -> None:
        units: dict[str, Callable[..., UnitReport]] = {
            "encode": self.encode,
            "denoise": self.denoise,
            "decode": self.decode,
        }
        while self.running:
            try:
                verb, *args = self.conn.recv()
            except (EOFError, OSError):  # the parent is gone: nobody is left to answer
                return
            if verb == "free":
                self.free(*args)
            elif verb == "shutdown":
                self.shutdown()
            else:
                unit_id, *unit_args = args
                start = time.perf_counter()
                report = units[verb](*unit_args)
                report.elapsed_s = time.perf_counter() - start
                self.conn.send(("result", unit_id, report))


def worker_main(conn: Connection, args: WorkerArgs) -> None:
    """Entry point of the spawned process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    worker = Worker(conn, args)
    if worker.load():
        worker.serve()
    conn.close()
