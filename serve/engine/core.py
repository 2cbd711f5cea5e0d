"""The engine loop: a thread that repeats schedule -> execute -> update.

The API thread only enqueues (`add_request`) and waits on a future; this thread owns the
executor. The scheduling policy here is plain FCFS with one request on the worker at a time;
`serve/engine/scheduler.py` (step-level batching, no torch) replaces `FcfsPolicy` behind the
same three calls: `add_request`, `schedule`, `update_from_output`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

from serve.engine.executor import RequestDone, RequestFailed, StepProgress, WorkerEvent, WorkerExecutor
from serve.engine.request import GenerationParams, Request, RequestStatus

log = logging.getLogger(__name__)

# How long one loop iteration waits for worker replies when idle. New requests are picked up at
# the next iteration, so this bounds the added queue latency (20 ms against seconds per video).
POLL_S = 0.02
# After the worker could not be restarted, wait this long before trying again.
RESTART_BACKOFF_S = 1.0


class EngineError(Exception):
    """Base of the errors `EngineClient.generate` raises."""


class QueueFull(EngineError):
    def __init__(self, max_queue: int, retry_after_s: int) -> None:
        super().__init__(f"the queue is full ({max_queue} requests waiting); retry in {retry_after_s}s")
        self.retry_after_s = retry_after_s


class EngineUnavailable(EngineError):
    """The engine is not running or its worker is down; nothing can be generated right now."""


class GenerationFailed(EngineError):
    def __init__(self, request_id: str, reason: str) -> None:
        super().__init__(reason)
        self.request_id = request_id
        self.reason = reason


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    mp4: bytes
    timings: dict[str, float]
    """Seconds per stage: queue, text_encode, denoise, decode, mp4."""


class FcfsPolicy:
    """First come, first served; one request on the worker at a time. Data in, data out."""

    def __init__(self) -> None:
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Drop a request that has not started; a running one finishes (cancelling mid-denoise is later work)."""
        for request in self.waiting:
            if request.request_id == request_id:
                self.waiting.remove(request)
                request.status = RequestStatus.CANCELLED
                return request
        return None

    def schedule(self) -> list[Request]:
        if self.running or not self.waiting:
            return []
        request = self.waiting.popleft()
        request.status = RequestStatus.RUNNING
        self.running[request.request_id] = request
        return [request]

    def update_from_output(self, events: list[WorkerEvent]) -> list[Request]:
        """Advance request state from worker events; return the requests that just finished."""
        finished = []
        for event in events:
            request = self.running.get(event.request_id)
            if request is None:
                continue  # a request failed earlier as a whole (worker restart); late news is moot
            if isinstance(event, StepProgress):
                request.step = event.step
                continue
            del self.running[event.request_id]
            request.status = RequestStatus.FINISHED if isinstance(event, RequestDone) else RequestStatus.FAILED
            request.error = event.reason if isinstance(event, RequestFailed) else None
            finished.append(request)
        return finished

    def drain(self) -> list[Request]:
        """Remove and return every request, running first (for failing them all at once)."""
        requests = [*self.running.values(), *self.waiting]
        self.running.clear()
        self.waiting.clear()
        return requests


class EngineCore:
    def __init__(self, executor: WorkerExecutor, max_queue: int) -> None:
        self.executor = executor
        self.max_queue = max_queue
        self._policy = FcfsPolicy()
        self._lock = threading.Lock()  # guards _policy and _futures against the API thread
        self._futures: dict[str, Future[GenerationResult]] = {}
        self._started_at: dict[str, float] = {}
        self._service_s = 1.0  # moving average of one generation, for Retry-After
        self._down_reason: str | None = "engine not started"
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reelserve-engine-core", daemon=True)

    # ---- called from the API side -------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and the loop; a second call is a no-op (run_server starts the engine
        before uvicorn so a load failure is a clean CLI error, then the app's lifespan calls it again)."""
        if self._thread.is_alive():
            return
        self.executor.start()
        self._down_reason = None
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self._down_reason = "engine stopped"
        self._fail_all("the server is shutting down", shutting_down=True)
        self.executor.stop()

    def add_request(self, params: GenerationParams) -> tuple[str, Future[GenerationResult]]:
        """Enqueue or refuse at once (QueueFull, EngineUnavailable): admission never waits."""
        if self._down_reason is not None:
            raise EngineUnavailable(self._down_reason)
        request, future = Request(params), Future()
        with self._lock:
            if len(self._policy.waiting) >= self.max_queue:
                raise QueueFull(self.max_queue, self._retry_after_s())
            self._policy.add_request(request)
            self._futures[request.request_id] = future
        # A client that went away cancels its future; drop its request if it has not started.
        future.add_done_callback(lambda f: f.cancelled() and self.abort(request.request_id))
        return request.request_id, future

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._policy.abort(request_id)
            self._futures.pop(request_id, None)

    def is_healthy(self) -> bool:
        return self._down_reason is None and self._thread.is_alive() and self.executor.is_ready()

    def health_reason(self) -> str | None:
        if self.is_healthy():
            return None
        return self._down_reason or "the worker process is not running (restarting)"

    def snapshot(self) -> dict[str, object]:
        """Queue state for health/metrics and tests: waiting ids and running id -> step."""
        with self._lock:
            return {
                "waiting": [r.request_id for r in self._policy.waiting],
                "running": {rid: r.step for rid, r in self._policy.running.items()},
            }

    # ---- the loop (engine thread) -------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.step()
            except Exception as e:  # the worker could not restart, or a bug: fail, back off, go on
                log.exception("engine step failed")
                self._down_reason = f"{type(e).__name__}: {e}"
                self._fail_all(f"engine error: {self._down_reason}")
                self._stopping.wait(RESTART_BACKOFF_S)

    def step(self) -> None:
        scheduled = self._schedule()
        events = self.executor.execute(scheduled, timeout=POLL_S)
        self._update(events)

    def _schedule(self) -> list[Request]:
        if not self.executor.is_ready():
            return []  # execute() restarts the worker first; keep requests queued meanwhile
        with self._lock:
            scheduled = self._policy.schedule()
        now = time.monotonic()
        for request in scheduled:
            self._started_at[request.request_id] = now
        return scheduled

    def _update(self, events: list[WorkerEvent]) -> None:
        self._down_reason = None  # execute() returned, so a worker is up
        outcomes = {e.request_id: e for e in events if not isinstance(e, StepProgress)}
        with self._lock:
            finished = self._policy.update_from_output(events)
            futures = [self._futures.pop(r.request_id, None) for r in finished]
        for request, future in zip(finished, futures, strict=True):
            self._resolve(request, future, outcomes[request.request_id])

    def _resolve(self, request: Request, future: Future | None, outcome: WorkerEvent) -> None:
        started = self._started_at.pop(request.request_id, request.arrival_time)
        if isinstance(outcome, RequestDone):
            self._service_s = 0.8 * self._service_s + 0.2 * (time.monotonic() - started)
            timings = {"queue": started - request.arrival_time, **outcome.timings}
            _settle(future, result=GenerationResult(request.request_id, outcome.mp4, timings))
        else:
            _settle(future, error=GenerationFailed(request.request_id, outcome.reason))

    def _fail_all(self, reason: str, shutting_down: bool = False) -> None:
        with self._lock:
            requests = self._policy.drain()
            futures = [self._futures.pop(r.request_id, None) for r in requests]
        for request, future in zip(requests, futures, strict=True):
            request.status, request.error = RequestStatus.FAILED, reason
            self._started_at.pop(request.request_id, None)
            error = EngineUnavailable(reason) if shutting_down else GenerationFailed(request.request_id, reason)
            _settle(future, error=error)

    def _retry_after_s(self) -> int:
        """A slot frees when the running request finishes: at most about one generation away."""
        return max(1, math.ceil(self._service_s))


def _settle(future: Future | None, result: GenerationResult | None = None, error: Exception | None = None) -> None:
    """Resolve a future unless its client already gave up (cancelled futures refuse results)."""
    if future is None or future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass  # cancelled between the check and the set: the client is gone, nothing to tell
