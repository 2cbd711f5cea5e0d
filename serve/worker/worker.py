"""The worker process: owns the model and the latents of the requests it holds; answers a few verbs.

The protocol is the frozen message classes of serve/engine/messages.py: a unit in (EncodeUnit,
StepUnit, DecodeUnit), one UnitReport out; Free and Shutdown need no answer; Ready or LoadFailed
once after loading. The model sits behind the `Runner` protocol (serve/worker/runner.py), and
the MP4 encoding of decoded chunks happens here, for the real runner and the test fake alike.

Latents never leave this process, nor do videos: a decode streams each MP4 into its artifact store
(`WorkerArgs.outputs`) and reports the key. Nothing here imports torch at module level: the API
process imports this module to name the spawn target.

With a decode lane (`--vae-overlap`), a DecodeUnit is answered at once with DecodeAccepted and runs on
a second thread (`DecodeLane`) while this loop takes the next units; its UnitReport follows when the
videos are stored. The requests it decodes are taken out of the worker's tables when it is handed
over, so nothing on the main lane (a Free, a later unit) can touch them meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from serve.engine.messages import (
    DecodeAccepted,
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
from serve.jobs.artifacts import STORAGE_FAILED, ArtifactStore, cause_of
from serve.jobs.records import video_key
from serve.loader.errors import CheckpointError
from serve.logs import about, configure_logging
from serve.pipeline.mp4 import stream_chunks_to_mp4s
from serve.worker.factory import WorkerArgs
from serve.worker.runner import Runner

log = logging.getLogger(__name__)


def import_object(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _is_oom(e: BaseException) -> bool:
    """torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class), told by name so
    this module needs no torch; or the host's MemoryError."""
    return isinstance(e, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(e).__mro__)


def _oom_reason(params: GenerationParams) -> str:
    return (
        f"out of memory at {params.width}x{params.height}, {params.num_frames} frames (even alone in its batch): "
        "lower the resolution or the number of frames, or hold fewer requests per worker (--max-running-per-worker)"
    )


def _release_cached_memory() -> None:
    """Hand the device memory torch's allocator keeps cached back before a retry, if torch is in
    use here at all (the fake runner never imports it)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _steps_done(state: Any) -> int | None:
    """How many steps a runner's state has taken (both runners' states keep `step`)."""
    return getattr(state, "step", None)


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
            log.error("storing a video failed: %s", e)  # the whole message (store, key) in the log
            return cause_of(e)  # the client sees the cause only, never a path or an endpoint
        return None


@dataclasses.dataclass
class _Finished:
    """Requests whose steps are done, taken out of the worker's tables to be decoded."""

    states: dict[str, Any]
    params: dict[str, GenerationParams]
    outputs: dict[str, str]


class DecodeLane:
    """The worker's second lane: one thread that runs decodes, in the order handed over, while the
    main loop takes other units. `units_run` counts the main lane's units, so a decode can say how many
    ran while it did (its report's `overlapped_units`)."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, "reelserve-decode-lane")
        self.units_run = 0  # written by the main loop only

    def submit(self, job: Callable[[], None]) -> None:
        self._thread.submit(job)

    def close(self) -> None:
        """Finish the decodes handed over (their reports are sent), then stop the thread."""
        self._thread.shutdown(wait=True)


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
        self.lane: DecodeLane | None = None  # made after loading, if `--vae-overlap` turns it on here
        self._sending = threading.Lock()  # the decode lane answers on the same pipe

    def send(self, message: Any) -> None:
        with self._sending:
            self.conn.send(message)

    def load(self) -> bool:
        try:
            factory = import_object(self.args.runner_factory)
            self.runner = factory(self.args.model_dir, self.args.device, self.args.dtype, self.args.options)
            samples = self.runner.calibrate() if self.args.calibrate else []
        except Exception as e:  # any load error must reach the parent as a message, not a silent exit
            if isinstance(e, CheckpointError):  # a bad checkpoint: its message names the file and the fix
                log.error("worker failed to load the model: %s", e)
            else:  # anything else is a bug: the traceback is what a report needs
                log.error("worker failed to load the model:\n%s", traceback.format_exc())
            self.conn.send(LoadFailed(_reason(e)))
            return False
        samples = tuple(tuple(s) for s in samples)
        fits = getattr(self.runner, "decode_lane_fits", False)  # the real runner's, set by its factory
        if self.args.options.vae.overlaps_on(self.args.device, fits):
            self.lane = DecodeLane()
        self.conn.send(Ready(self.args.device, self.args.dtype, samples, memory_plan(self.runner)))
        return True

    # ---- units ----------------------------------------------------------------------------------

    def encode(self, unit: EncodeUnit) -> UnitReport:
        params = dict(unit.requests)
        outputs = dict(zip(params, unit.outputs or (next(iter(self.stores), ""),) * len(params), strict=True))
        states: dict[str, Any] = {}

        def start(ids: list[str]) -> None:
            states.update(zip(ids, self.runner.start([params[rid] for rid in ids]), strict=True))

        # Starting has no effect outside the states it returns: a part that raised is rerun whole.
        failed = self._isolating(list(params), start, params, lambda ids: ids)
        experts = {}
        for rid, state in states.items():
            self.states[rid], self.params[rid], self.outputs[rid] = state, params[rid], outputs[rid]
            experts[rid] = tuple(self.runner.experts_of(state))
        return UnitReport(unit.unit_id, failed=failed, experts=experts)

    def denoise(self, unit: StepUnit) -> UnitReport:
        """One step for the batch; if it raises, the members find out alone (`_isolating`).

        Rerunning a member is sound because a runner's step (ModelRunner and the test fake alike)
        advances a request (latents, sampler, `step`) only after its forward pass returned; what
        the forward itself updates (the step cache's residuals) is recomputed from the same inputs.
        A member whose `step` moved before a batch-mate raised has taken its step: it is not rerun.
        """
        ids = list(unit.request_ids)
        before = {rid: _steps_done(self.states[rid]) for rid in ids}

        def step(part: list[str]) -> None:
            self.runner.denoise_step([self.states[rid] for rid in part], unit.expert)

        def not_stepped(part: list[str]) -> list[str]:
            return [rid for rid in part if _steps_done(self.states[rid]) == before[rid]]

        failed = self._isolating(ids, step, self.params, not_stepped)
        self.free(tuple(failed))
        return UnitReport(unit.unit_id, failed=failed)

    def decode(self, unit: DecodeUnit) -> UnitReport:
        """Decode requests of one shape together, streaming each into its MP4 in its artifact store;
        a video is stored whole or not at all (a failed write leaves no partial file). Decoding reads
        the states without changing them, so a part that raised is decoded again in smaller parts."""
        return self._decode_finished(unit.unit_id, self._take(unit.request_ids))

    def _take(self, request_ids: tuple[str, ...]) -> _Finished:
        """These requests' tables, removed from the worker's (as `free` does)."""
        finished = _Finished(
            {rid: self.states[rid] for rid in request_ids},
            {rid: self.params[rid] for rid in request_ids},
            {rid: self.outputs[rid] for rid in request_ids},
        )
        self.free(request_ids)
        return finished

    def _decode_finished(self, unit_id: int, finished: _Finished) -> UnitReport:
        ids = list(finished.states)
        counters = sum_counters([self.runner.counters(state) for state in finished.states.values()])
        stored: dict[str, str | None] = {}  # request id -> why its commit failed (None: stored)
        mp4_s = [0.0]

        def decode(part: list[str]) -> None:
            stored.update(zip(part, self._decode_part(finished, part, mp4_s), strict=True))

        failed = self._isolating(ids, decode, finished.params, lambda part: part, _decode_failure)
        outputs = {}
        for rid, error in stored.items():
            if error is None:
                outputs[rid] = video_key(rid)
                log.info("video stored in %s", finished.outputs[rid], extra=about(rid))
            else:
                failed[rid] = f"{STORAGE_FAILED}: {error}"
        return UnitReport(unit_id, failed=failed, outputs=outputs, mp4_s=mp4_s[0], counters=counters)

    def decode_on_lane(self, unit: DecodeUnit) -> None:
        """Hand the decode to the lane and tell the engine so (before the lane can report: the engine
        must know the unit is on the lane to take its report); the report follows from the lane."""
        finished = self._take(unit.request_ids)
        # Entered on the lane's thread: on CUDA a side stream that waits for the steps queued so far.
        handoff = getattr(self.runner, "lane_handoff", contextlib.nullcontext)()
        lane = self.lane
        self.send(DecodeAccepted(unit.unit_id))

        def job() -> None:
            start, before = time.perf_counter(), lane.units_run  # not counting its wait behind another decode
            try:
                with handoff:
                    report = self._decode_finished(unit.unit_id, finished)
            except Exception as e:  # a bug outside the per-request isolation: still answer for each
                log.error("decode lane failed:\n%s", traceback.format_exc(), extra=about(*unit.request_ids))
                report = UnitReport(unit.unit_id, failed=dict.fromkeys(unit.request_ids, _reason(e)))
            elapsed, overlapped = time.perf_counter() - start, lane.units_run - before
            with contextlib.suppress(OSError):  # the engine is gone: nobody is left to tell
                self.send(dataclasses.replace(report, elapsed_s=elapsed, overlapped_units=overlapped))

        lane.submit(job)

    def _decode_part(self, finished: _Finished, ids: list[str], mp4_s: list[float]) -> list[str | None]:
        """Decode and store these videos; each one's commit error (None: stored). Raises, having
        stored none, if decoding or encoding failed."""
        states = [finished.states[rid] for rid in ids]
        params = [finished.params[rid] for rid in ids]
        writes = [self.stores[finished.outputs[rid]].writing(video_key(rid)) for rid in ids]
        with contextlib.ExitStack() as opened:
            sinks = [opened.enter_context(_Deferred(w)) for w in writes]
            timings = stream_chunks_to_mp4s(
                self.runner.decode_chunks(states),
                [sink.path for sink in sinks],
                [p.fps for p in params],
                [p.lossless for p in params],
                shapes=[(p.num_frames, p.height, p.width) for p in params],
            )
        mp4_s[0] += timings["mp4"]
        return [sink.commit() for sink in sinks]

    def _isolating(
        self,
        ids: list[str],
        run: Callable[[list[str]], None],
        params: Mapping[str, GenerationParams],
        pending: Callable[[list[str]], list[str]],
        reason: Callable[[BaseException], str] = _reason,
    ) -> dict[str, str]:
        """Run a batched stage so that a failure belongs to the request that caused it: if the
        batch raises, those of its members still `pending` (not done by the failed try) run again
        alone, or, after an out-of-memory error, in halves; a request that fails alone fails with
        its reason. Returns request id -> reason for the ones that failed."""
        try:
            run(ids)
            return {}
        except Exception as e:
            trace = traceback.format_exc()
            log.error("%s of %d request(s) failed:\n%s", run.__name__, len(ids), trace, extra=about(*ids))
            oom, why = _is_oom(e), reason(e)
        # Out here the exception and its traceback are gone, and with them the frames that held the
        # failed try's tensors: the retry gets that memory back.
        if oom:
            _release_cached_memory()
        if len(ids) == 1:
            return {ids[0]: _oom_reason(params[ids[0]]) if oom else why}
        left = pending(ids)
        parts = [left[: (len(left) + 1) // 2], left[(len(left) + 1) // 2 :]] if oom else [[rid] for rid in left]
        failed: dict[str, str] = {}
        for part in parts:
            if part:
                failed.update(self._isolating(part, run, params, pending, reason))
        return failed

    def free(self, request_ids: tuple[str, ...]) -> None:
        for rid in request_ids:
            self.states.pop(rid, None)
            self.params.pop(rid, None)
            self.outputs.pop(rid, None)

    def run_unit(self, unit: Unit) -> UnitReport:
        start = time.perf_counter()
        if isinstance(unit, EncodeUnit):
            report = self.encode(unit)
        elif isinstance(unit, StepUnit):
            report = self.denoise(unit)
        else:
            report = self.decode(unit)
        if self.lane is not None:
            self.lane.units_run += 1
        return dataclasses.replace(report, elapsed_s=time.perf_counter() - start)

    def serve(self) -> None:
        try:
            self._serve()
        finally:
            if self.lane is not None:
                self.lane.close()

    def _serve(self) -> None:
        while self.running:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the parent is gone: nobody is left to answer
                return
            if isinstance(message, Free):
                self.free(message.request_ids)
            elif isinstance(message, Shutdown):
                self.running = False
            elif isinstance(message, DecodeUnit) and self.lane is not None:
                self.decode_on_lane(message)
            else:
                self.send(self.run_unit(message))


def memory_plan(runner: Any) -> str:
    """The runner's residency as one phrase; runners without one (test fakes, CPU) keep all resident.
    The runner holds the `ResidencyManager`; the mode and its settings are on its `config`."""
    manager = getattr(runner, "residency", None)
    if manager is None:
        return "resident"
    residency = manager.config
    parts = [residency.mode, f"text encoder {residency.text_encoder}"]
    if residency.mode == "block-offload":
        parts.append(f"prefetch {residency.prefetch_blocks} blocks")
    if residency.mode == "expert-swap":
        parts.append(f"idle expert from {residency.offload_source}")
    return ", ".join(parts)


def worker_main(conn: Connection, args: WorkerArgs) -> None:
    """Entry point of the spawned process."""
    configure_logging(args.log_format, args.log_level)  # a spawned process starts with logging unconfigured
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    worker = Worker(conn, args)
    if worker.load():
        worker.serve()
    conn.close()
