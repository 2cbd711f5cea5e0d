"""The worker process: owns the model and the latents of the requests it holds; answers a few verbs.

The protocol is the frozen message classes of serve/engine/messages.py: a unit in (EncodeUnit,
StepUnit, DecodeUnit), one UnitReport out; Free and Shutdown need no answer; Ready or LoadFailed
once after loading. The model sits behind the `Runner` protocol (serve/worker/runner.py), and
the MP4 encoding of decoded chunks happens here, for the real runner and the test fake alike.

Latents never leave this process; a decode returns the finished MP4s' bytes. Nothing here imports
torch at module level: the API process imports this module to name the spawn target.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import logging
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from serve.engine.messages import (
    DecodeUnit,
    EncodeUnit,
    Free,
    LoadFailed,
    Ready,
    Shutdown,
    StepUnit,
    Unit,
    UnitReport,
)
from serve.engine.request import GenerationParams
from serve.pipeline.mp4 import stream_chunks_to_mp4s
from serve.worker.factory import WorkerArgs
from serve.worker.runner import Runner

log = logging.getLogger(__name__)


def import_object(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def sum_counters(counters: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counters:
        for name, value in c.items():
            total[name] = total.get(name, 0) + value
    return total


class Worker:
    def __init__(self, conn: Connection, args: WorkerArgs) -> None:
        self.conn = conn
        self.args = args
        self.runner: Runner | None = None
        self.states: dict[str, Any] = {}  # request_id -> the runner's per-request state
        self.params: dict[str, GenerationParams] = {}
        self.running = True

    def load(self) -> bool:
        try:
            factory = import_object(self.args.runner_factory)
            self.runner = factory(self.args.model_dir, self.args.device, self.args.dtype, self.args.options)
            samples = self.runner.calibrate() if self.args.calibrate else []
        except Exception as e:  # any load error must reach the parent as a message, not a silent exit
            log.error("worker failed to load the model:\n%s", traceback.format_exc())
            self.conn.send(LoadFailed(_reason(e)))
            return False
        self.conn.send(Ready(self.args.device, self.args.dtype, tuple(tuple(s) for s in samples)))
        return True

    # ---- units ----------------------------------------------------------------------------------

    def encode(self, unit: EncodeUnit) -> UnitReport:
        try:
            states = self.runner.start([params for _, params in unit.requests])
        except Exception as e:  # the batch's text encode failed: every request in it fails
            log.error("encode failed:\n%s", traceback.format_exc())
            return UnitReport(unit.unit_id, failed={rid: _reason(e) for rid, _ in unit.requests})
        experts = {}
        for (rid, params), state in zip(unit.requests, states, strict=True):
            self.states[rid], self.params[rid] = state, params
            experts[rid] = tuple(self.runner.experts_of(state))
        return UnitReport(unit.unit_id, experts=experts)

    def denoise(self, unit: StepUnit) -> UnitReport:
        try:
            self.runner.denoise_step([self.states[rid] for rid in unit.request_ids], unit.expert)
        except Exception as e:  # the batch shared one forward pass: all its requests fail
            log.error("denoise step failed:\n%s", traceback.format_exc())
            self.free(unit.request_ids)
            return UnitReport(unit.unit_id, failed={rid: _reason(e) for rid in unit.request_ids})
        return UnitReport(unit.unit_id)

    def decode(self, unit: DecodeUnit) -> UnitReport:
        """Decode requests of one shape together, streaming each into its MP4 (only bytes leave)."""
        ids = unit.request_ids
        states = [self.states.pop(rid) for rid in ids]
        params = [self.params.pop(rid) for rid in ids]
        counters = sum_counters([self.runner.counters(s) for s in states])
        sinks = [io.BytesIO() for _ in ids]
        try:
            timings = stream_chunks_to_mp4s(
                self.runner.decode_chunks(states),
                sinks,
                [p.fps for p in params],
                [p.lossless for p in params],
                shapes=[(p.num_frames, p.height, p.width) for p in params],
            )
        except Exception as e:
            log.error("decode failed:\n%s", traceback.format_exc())
            return UnitReport(unit.unit_id, failed={rid: _reason(e) for rid in ids}, counters=counters)
        mp4 = {rid: sink.getvalue() for rid, sink in zip(ids, sinks, strict=True)}
        return UnitReport(unit.unit_id, mp4=mp4, mp4_s=timings["mp4"], counters=counters)

    def free(self, request_ids: tuple[str, ...]) -> None:
        for rid in request_ids:
            self.states.pop(rid, None)
            self.params.pop(rid, None)

    def run_unit(self, unit: Unit) -> UnitReport:
        start = time.perf_counter()
        if isinstance(unit, EncodeUnit):
            report = self.encode(unit)
        elif isinstance(unit, StepUnit):
            report = self.denoise(unit)
        else:
            report = self.decode(unit)
        return dataclasses.replace(report, elapsed_s=time.perf_counter() - start)

    def serve(self) -> None:
        while self.running:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the parent is gone: nobody is left to answer
                return
            if isinstance(message, Free):
                self.free(message.request_ids)
            elif isinstance(message, Shutdown):
                self.running = False
            else:
                self.conn.send(self.run_unit(message))


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
