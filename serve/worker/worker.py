"""The worker process: owns the model and the latents of the requests it holds; answers a few verbs.

The protocol is the frozen message classes of serve/engine/messages.py: a unit in (EncodeUnit,
StepUnit, DecodeUnit), one UnitReport out; Free and Shutdown need no answer; Ready or LoadFailed
once after loading. The model sits behind the `Runner` protocol (serve/worker/runner.py), and
the MP4 encoding of decoded chunks happens here, for the real runner and the test fake alike.

Latents never leave this process, nor do videos: a decode streams each MP4 into its artifact store
(`WorkerArgs.outputs`) and reports the key. Nothing here imports torch at module level: the API
process imports this module to name the spawn target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
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
from serve.jobs.artifacts import STORAGE_FAILED, ArtifactStore
from serve.jobs.records import video_key
from serve.pipeline.mp4 import stream_chunks_to_mp4s
from serve.worker.factory import WorkerArgs
from serve.worker.runner import Runner

log = logging.getLogger(__name__)


def import_object(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _decode_failure(e: BaseException) -> str:
    """Why a decode failed; a write error (disk full, read-only) is a storage failure."""
    if isinstance(e, OSError):  # PyAV's write errors are OSErrors too
        return f"{STORAGE_FAILED}: {getattr(e, 'strerror', None) or e}"
    return _reason(e)


class _Deferred:
    """An artifact write whose commit is put off until every video of the batch is encoded, so each
    request's commit can fail alone (`commit`) while an encode error discards them all (`__exit__`)."""

    def __init__(self, write: contextlib.AbstractContextManager[Path]) -> None:
        self.write = write
        self.path: Path | None = None
        self.done = False

    def __enter__(self) -> _Deferred:
        self.path = self.write.__enter__()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None and not self.done:
            self.done = True
            with contextlib.suppress(Exception):  # the original error is what the request reports
                self.write.__exit__(kind, error, traceback)

    def commit(self) -> str | None:
        """Store the written file under its key; the error's message, if that failed."""
        self.done = True
        try:
            self.write.__exit__(None, None, None)
        except Exception as e:
            return str(e)
        return None


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
        self.outputs: dict[str, str] = {}  # request_id -> the name of the store its MP4 goes to
        self.stores: dict[str, ArtifactStore] = {name: target.open() for name, target in args.outputs}
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
        outputs = unit.outputs or (next(iter(self.stores), ""),) * len(unit.requests)
        for (rid, params), state, output in zip(unit.requests, states, outputs, strict=True):
            self.states[rid], self.params[rid], self.outputs[rid] = state, params, output
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
        """Decode requests of one shape together, streaming each into its MP4 in its artifact store;
        a video is stored whole or not at all (a failed write leaves no partial file)."""
        ids = unit.request_ids
        states = [self.states.pop(rid) for rid in ids]
        params = [self.params.pop(rid) for rid in ids]
        stores = [self.stores[self.outputs.pop(rid)] for rid in ids]
        counters = sum_counters([self.runner.counters(s) for s in states])
        writes = [store.writing(video_key(rid)) for store, rid in zip(stores, ids, strict=True)]
        try:
            with contextlib.ExitStack() as opened:
                sinks = [opened.enter_context(_Deferred(w)) for w in writes]
                timings = stream_chunks_to_mp4s(
                    self.runner.decode_chunks(states),
                    [sink.path for sink in sinks],
                    [p.fps for p in params],
                    [p.lossless for p in params],
                    shapes=[(p.num_frames, p.height, p.width) for p in params],
                )
        except Exception as e:  # nothing was stored: every request of the batch fails
            log.error("decode failed:\n%s", traceback.format_exc())
            return UnitReport(unit.unit_id, failed={rid: _decode_failure(e) for rid in ids}, counters=counters)
        failed, outputs = {}, {}
        for rid, sink in zip(ids, sinks, strict=True):
            error = sink.commit()
            if error is None:
                outputs[rid] = video_key(rid)
            else:
                failed[rid] = f"{STORAGE_FAILED}: {error}"
        return UnitReport(unit.unit_id, failed=failed, outputs=outputs, mp4_s=timings["mp4"], counters=counters)

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
