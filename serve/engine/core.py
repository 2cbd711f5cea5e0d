"""The engine loop: a thread that repeats schedule -> execute -> update.

The API side only enqueues (`add_request`), cancels, and reads state; this thread owns the
executor. Policy (what runs next, on which worker, in which batch) lives in the scheduler.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

from serve.engine.cost_model import CostModel
from serve.engine.executor import Executor, UnitOutcome
from serve.engine.metrics import EngineMetrics
from serve.engine.request import GenerationParams, Request, RequestStatus
from serve.engine.scheduler import MovedToLane, QueueFullError, Scheduler, WorkerDied, WorkUnit
from serve.jobs.artifacts import ArtifactStore
from serve.logs import about

log = logging.getLogger(__name__)

# How long one loop iteration waits for worker reports. New requests are picked up at the next
# iteration, so this bounds the added queue latency (20 ms against seconds per video).
POLL_S = 0.02
# With no worker up (a restart failed), wait this long before trying again.
RESTART_BACKOFF_S = 1.0


class EngineError(Exception):
    """Base of the errors `EngineClient.generate` raises."""


class QueueFull(EngineError):
    def __init__(self, max_queue: int, retry_after_s: int) -> None:
        super().__init__(f"the queue is full ({max_queue} requests waiting); retry in {retry_after_s}s")
        self.retry_after_s = retry_after_s


class DuplicateRequest(EngineError):
    """A request with this id is still in the engine (its job was claimed again meanwhile)."""


class EngineUnavailable(EngineError):
    """The engine is not running or no worker is up; nothing can be generated right now."""


class GenerationFailed(EngineError):
    def __init__(self, request_id: str, reason: str, cancelled: bool = False) -> None:
        super().__init__(reason)
        self.request_id = request_id
        self.reason = reason
        self.cancelled = cancelled


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    artifact: str
    """The MP4's key in `store` (the worker wrote it there; the bytes never crossed this process)."""
    store: ArtifactStore
    timings: dict[str, float]
    """Seconds per stage: queue, text_encode, denoise, decode, mp4."""
    trace: tuple[tuple[str, int, int], ...] = ()
    """(unit kind, worker, batch size) for every unit the request took part in."""

    @property
    def mp4(self) -> bytes:
        """The whole video, read back from its store (tests, small videos)."""
        data = self.store.get_bytes(self.artifact)
        if data is None:
            raise FileNotFoundError(f"the video of {self.request_id} is no longer stored")
        return data


class EngineCore:
    def __init__(
        self,
        executor: Executor,
        scheduler: Scheduler,
        outputs: dict[str, ArtifactStore],
        request_timeout_s: float = 3600.0,
        model_name: str = "",
    ) -> None:
        """`outputs`: the artifact stores the workers write MP4s to (the same names as their
        `WorkerArgs.outputs`), opened here to hand results back; `model_name`: the served model's
        name, the metrics' `model_name` label."""
        self.executor = executor
        self.scheduler = scheduler
        self.outputs = outputs
        self.request_timeout_s = request_timeout_s
        self.metrics = EngineMetrics(model_name)
        self._lock = threading.Lock()  # guards scheduler and _futures against the API thread
        self._futures: dict[str, Future[GenerationResult]] = {}
        self._encode_started: dict[str, float] = {}
        self._artifacts: dict[str, tuple[str, float]] = {}  # request_id -> (MP4 key, encode seconds)
        self._counted_swaps = 0
        self._last_restart = -math.inf
        self._down_reason: str | None = "engine not started"
        self.ready = threading.Event()  # loaded and warm: /ready
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reelserve-engine-core", daemon=True)

    # ---- called from the API side ---------------------------------------------------------------

    def start(self) -> None:
        """Start the workers and the loop; a second call is a no-op (run_server starts the engine
        before uvicorn so a load failure is a clean CLI error, then the app's lifespan calls it again)."""
        if self._thread.is_alive():
            return
        self.executor.start()
        self._calibrate()
        self._down_reason = None
        self._thread.start()
        self.ready.set()

    def _calibrate(self) -> None:
        samples = [s for w in self.executor.workers if w.info is not None for s in w.info.cost_samples]
        self.scheduler.cost = CostModel.fit([tuple(s) for s in samples])
        log.info("cost model from %d warmup samples: %s", len(samples), self.scheduler.cost)

    def stop(self) -> None:
        self.ready.clear()
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self.ready.clear()  # the loop's last iteration may have set it again
        self._down_reason = "engine stopped"
        self._fail_all("the server is shutting down", unavailable=True)
        self.executor.stop()

    def add_request(
        self, params: GenerationParams, request_id: str | None = None, output: str | None = None
    ) -> tuple[str, Future[GenerationResult]]:
        """Enqueue or refuse at once (QueueFull, EngineUnavailable): admission never waits.
        `params` are resolved (defaults filled, preset applied: see serve/api/params.py); a job
        passes its own id and `output` (the artifact store its MP4 goes to; default the first)."""
        if self._down_reason is not None:
            raise EngineUnavailable(self._down_reason)
        output = output or next(iter(self.outputs))
        if output not in self.outputs:
            raise ValueError(f"no artifact store named {output!r}; the engine has {sorted(self.outputs)}")
        request, future = Request(params, output=output), Future()
        if request_id is not None:
            request.request_id = request_id
        request.deadline = request.arrival_time + self.request_timeout_s
        with self._lock:
            if request.request_id in self.scheduler.requests:  # a job claimed again while it still runs
                raise DuplicateRequest(f"request {request.request_id} is already running here")
            try:
                self.scheduler.add_request(request)
            except QueueFullError as e:
                raise QueueFull(e.max_queue, self._retry_after_s()) from None
            self._futures[request.request_id] = future
        log.info("queued: %s", _shape(params), extra=about(request.request_id))
        # A client that went away cancels its future: drop its request at the next step boundary.
        future.add_done_callback(lambda f: f.cancelled() and self.abort(request.request_id))
        return request.request_id, future

    def abort(self, request_id: str) -> bool:
        with self._lock:
            return self.scheduler.abort(request_id)

    def is_healthy(self) -> bool:
        return self._down_reason is None and self._thread.is_alive() and self.executor.any_ready()

    def health_reason(self) -> str | None:
        if self.is_healthy():
            return None
        return self._down_reason or "the worker process is not running (restarting)"

    def unready_reason(self) -> str | None:
        """Which workers cannot take work now and why (/ready); None when all can."""
        return "; ".join(self.executor.unready()) or None

    def request_state(self, request_id: str) -> dict | None:
        """Status, step, queue position and ETA of a live request (None once it ended)."""
        with self._lock:
            r = self.scheduler.requests.get(request_id)
            if r is None:
                return None
            return {
                "status": r.status,
                "progress": r.progress,
                "step": r.step,
                "total_steps": r.total_steps,
                "queue_position": self.scheduler.queue_position(request_id),
                "eta_s": self.scheduler.eta_s(request_id),
                "worker": r.worker,
            }

    def waiting_count(self) -> int:
        with self._lock:
            return len(self.scheduler.waiting)

    def retry_after_s(self) -> int:
        with self._lock:
            return self._retry_after_s()

    def fail_all(self, reason: str) -> None:
        """Fail every queued and running request as unavailable (a drain that ran out of time)."""
        self._fail_all(reason, unavailable=True)

    def active_count(self) -> int:
        """Requests queued or running."""
        with self._lock:
            return len(self.scheduler.requests)

    def snapshot(self) -> dict[str, object]:
        """Queue state for tests and debugging: waiting ids, and id -> step of those on a worker."""
        with self._lock:
            waiting = [r.request_id for r in self.scheduler.waiting]
            running = {rid: r.step for rid, r in self.scheduler.requests.items() if r.worker is not None}
        return {"waiting": waiting, "running": running}

    def render_metrics(self) -> bytes:
        with self._lock:
            counts = self.scheduler.counts()
        self.metrics.num_requests_waiting.set(counts["waiting"])
        self.metrics.num_requests_running.set(counts["running"])
        return self.metrics.render()

    # ---- the loop (engine thread) ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.step()
            except Exception as e:  # a bug in the loop: fail what is in flight, back off, go on
                log.exception("engine step failed")
                self._fail_all(f"engine error: {type(e).__name__}: {e}")
                self._stopping.wait(RESTART_BACKOFF_S)

    def step(self) -> None:
        output = self._schedule()
        events = self.executor.poll(POLL_S) if output is not None else []
        self._update(events)

    def _schedule(self):
        self._maybe_restart()
        if not self.executor.any_ready():
            self.ready.clear()
            self._down_reason = f"no worker is up: {self.unready_reason()}"
            # While a replacement loads, look for its Ready often; otherwise wait out the backoff.
            self._stopping.wait(POLL_S if self.executor.loading() else RESTART_BACKOFF_S)
            return None
        self._down_reason = None
        self._note_readiness()
        now = time.monotonic()
        with self._lock:
            output = self.scheduler.schedule(self.executor.idle_workers(), now)
            payloads = [self._params(unit) for unit in output.units]
        for worker, ids in output.free.items():
            self.executor.free(worker, ids)
        for unit, (params, outputs) in zip(output.units, payloads, strict=True):
            self._note_start(unit, now)
            self.executor.submit(unit, params, outputs)
        self._settle_ended(output.ended)
        return output

    def _params(self, unit: WorkUnit) -> tuple[tuple[tuple[str, GenerationParams], ...], tuple[str, ...]]:
        """What an encode unit sends along: its requests' params and output stores (other units
        send ids only)."""
        if unit.kind != "encode":
            return (), ()
        requests = [self.scheduler.requests[rid] for rid in unit.request_ids]
        return tuple((r.request_id, r.params) for r in requests), tuple(r.output for r in requests)

    def _note_start(self, unit: WorkUnit, now: float) -> None:
        if unit.kind == "encode":
            for rid in unit.request_ids:
                self._encode_started[rid] = now
            log.info("started on worker %d", unit.worker, extra=about(*unit.request_ids))
        elif unit.kind == "denoise":
            self.metrics.denoising_batch_size.observe(len(unit.request_ids))

    def _update(self, events: list[UnitOutcome | WorkerDied | MovedToLane]) -> None:
        results = []
        for event in events:
            if isinstance(event, WorkerDied | MovedToLane):
                if isinstance(event, WorkerDied):
                    self.metrics.worker_restarts.inc()
                results.append(event)
                continue
            results.append(event.result)
            if event.result.unit.kind == "denoise":
                self.metrics.denoising_step_time.observe(event.result.elapsed_s)
            for outcome, count in event.report.counters.items():
                self.metrics.step_cache_steps(outcome, count)
            self.metrics.decode_overlapped_units.inc(event.report.overlapped_units)
            for rid, key in event.report.outputs.items():
                self._artifacts[rid] = (key, event.report.mp4_s)
        with self._lock:
            ended = self.scheduler.update_from_output(results)
            swaps = self.scheduler.swaps
        self.metrics.expert_swaps.inc(swaps - self._counted_swaps)
        self._counted_swaps = swaps
        self._settle_ended(ended)

    def _maybe_restart(self) -> None:
        """Take in restarted workers that have loaded, and restart dead ones, at most once per
        backoff period (a restart that fails would otherwise spin, reloading the model in a loop).
        Neither waits for a load: the loop goes on serving with the workers that are up."""
        self.executor.collect_restarts()
        now = time.monotonic()
        if self.executor.has_dead() and now - self._last_restart >= RESTART_BACKOFF_S:
            self._last_restart = now
            self.executor.restart_dead()

    def _note_readiness(self) -> None:
        """/ready is 200 only while every worker is up (and never again once stopping)."""
        if self.executor.unready() or self._stopping.is_set():
            self.ready.clear()
        else:
            self.ready.set()

    def _settle_ended(self, ended: list[Request]) -> None:
        for r in ended:
            with self._lock:
                future = self._futures.pop(r.request_id, None)
            started = self._encode_started.pop(r.request_id, r.arrival_time)
            key, mp4_s = self._artifacts.pop(r.request_id, (None, 0.0))
            self.metrics.request_ended(r.status.name.lower())
            if r.status == RequestStatus.FINISHED and key is not None:
                timings = {"queue": started - r.arrival_time, **r.timings, "mp4": mp4_s}
                self._observe_finished(r, timings)
                store = self.outputs[r.output]
                result = GenerationResult(r.request_id, key, store, timings, tuple(r.trace))
                if not _settle(future, result=result):
                    store.delete(key)  # its client is gone (a disconnect): nobody will read it
            else:
                cancelled = r.status == RequestStatus.CANCELLED
                level = logging.INFO if cancelled else logging.WARNING
                log.log(level, "%s: %s", r.status.name.lower(), r.error or "failed", extra=about(r.request_id))
                _settle(future, error=GenerationFailed(r.request_id, r.error or "failed", cancelled))

    def _observe_finished(self, r: Request, timings: dict[str, float]) -> None:
        e2e = time.monotonic() - r.arrival_time
        self.metrics.e2e_request_latency.observe(e2e)
        self.metrics.request_queue_time.observe(timings["queue"])
        self.metrics.request_inference_time.observe(e2e - timings["queue"])
        for stage, seconds in timings.items():
            self.metrics.stage_time(stage, seconds)
        stages = ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in timings.items())
        log.info("finished in %.2f s (%s)", e2e, stages, extra=about(r.request_id))

    def _fail_all(self, reason: str, unavailable: bool = False) -> None:
        with self._lock:
            requests = self.scheduler.drain(reason)
            futures = [self._futures.pop(r.request_id, None) for r in requests]
        for r, future in zip(requests, futures, strict=True):
            error = EngineUnavailable(reason) if unavailable else GenerationFailed(r.request_id, reason)
            _settle(future, error=error)

    def _retry_after_s(self) -> int:
        """When a queue slot should free: the least-loaded worker's predicted remaining work."""
        loads = [self.scheduler.worker_load_s(w) for w in range(self.scheduler.num_workers)]
        return max(1, math.ceil(min(loads)))


def _shape(p: GenerationParams) -> str:
    return f"{p.width}x{p.height}, {p.num_frames} frames, {p.num_inference_steps} steps"


def _settle(future: Future | None, result: GenerationResult | None = None, error: Exception | None = None) -> bool:
    """Resolve a future unless its client already gave up (cancelled futures refuse results);
    whether it was resolved."""
    if future is None or future.done():
        return False
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        return False  # cancelled between the check and the set: the client is gone, nothing to tell
    return True
