"""Starts the worker process, sends it work, turns its replies into events, restarts it if it dies.

Only the EngineCore thread calls into an executor (start/stop excepted), so it needs no locks.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from serve.engine.request import Request
from serve.worker.worker import WorkerArgs, worker_main

log = logging.getLogger(__name__)

# spawn, never fork: a forked child would inherit the server's threads and any CUDA state.
_MP = mp.get_context("spawn")


@dataclass(frozen=True)
class StepProgress:
    request_id: str
    step: int
    total: int


@dataclass(frozen=True)
class RequestDone:
    request_id: str
    mp4: bytes
    timings: dict[str, float]


@dataclass(frozen=True)
class RequestFailed:
    request_id: str
    reason: str


WorkerEvent = StepProgress | RequestDone | RequestFailed


class WorkerStartError(RuntimeError):
    """The worker could not load the model; the message says why and what to check."""


def parse_reply(message: tuple) -> WorkerEvent:
    kind, *fields = message
    types = {"progress": StepProgress, "done": RequestDone, "failed": RequestFailed}
    if kind not in types:
        raise ValueError(f"unexpected worker message {kind!r}")
    return types[kind](*fields)


class WorkerExecutor:
    """One worker process on one device."""

    def __init__(self, args: WorkerArgs, start_timeout_s: float = 600.0) -> None:
        self.args = args
        self.start_timeout_s = start_timeout_s
        self.restarts = 0
        self._proc: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._in_flight: set[str] = set()
        self._ready = False

    @property
    def worker_pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def is_ready(self) -> bool:
        """Loaded and alive. Safe from any thread: it peeks at the sentinel without reaping."""
        proc = self._proc
        return self._ready and proc is not None and not wait([proc.sentinel], timeout=0)

    def start(self) -> None:
        """Spawn a worker and block until it has loaded the model (raises WorkerStartError)."""
        self._ready = False
        parent, child = _MP.Pipe()
        proc = _MP.Process(target=worker_main, args=(child, self.args), name="reelserve-worker", daemon=True)
        proc.start()
        child.close()  # keep only the worker's copy, so its death shows here as EOF
        self._proc, self._conn = proc, parent
        self._await_ready()

    def _await_ready(self) -> None:
        if not self._conn.poll(self.start_timeout_s):
            self._kill()
            raise WorkerStartError(
                f"worker did not load {self.args.model_dir} within {self.start_timeout_s:.0f}s; "
                "raise worker_start_timeout_s or check the worker log"
            )
        try:
            kind, detail = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(5)
            raise WorkerStartError(f"worker exited (code {self._proc.exitcode}) while loading; see its log") from None
        if kind != "ready":
            self._kill()
            raise WorkerStartError(f"worker could not load {self.args.model_dir}: {detail}")
        self._ready = True
        log.info("worker pid %s ready: %s", self._proc.pid, detail)

    def execute(self, requests: list[Request], timeout: float) -> list[WorkerEvent]:
        """Send newly scheduled requests, then return whatever the worker reported within `timeout`."""
        for request in requests:
            self._send(request)
        return self._collect(timeout)

    def _send(self, request: Request) -> None:
        self._in_flight.add(request.request_id)
        # A dead worker refuses the send; _collect notices and fails this request with the reason.
        with contextlib.suppress(OSError):
            self._conn.send(("execute", request.request_id, request.params))

    def _collect(self, timeout: float) -> list[WorkerEvent]:
        if not self._ready:  # it died at an earlier call (or a restart failed): start a fresh one
            self._restart()
            return []
        wait([self._conn, self._proc.sentinel], timeout)
        events: list[WorkerEvent] = []
        try:
            while self._conn.poll():
                events.append(parse_reply(self._conn.recv()))
        except (EOFError, OSError):
            pass  # the worker closed its end; the liveness check below handles it
        for event in events:
            if not isinstance(event, StepProgress):
                self._in_flight.discard(event.request_id)
        if not self.is_ready():
            events += self._fail_in_flight()
        return events

    def _fail_in_flight(self) -> list[RequestFailed]:
        """The worker died: fail what it held. Restarting waits for the next call, so these
        failures reach their clients even if the restart then fails."""
        self._ready = False
        self._proc.join()
        reason = f"worker process died (exit code {self._proc.exitcode}) while running this request"
        log.error("%s; failing %d request(s), restarting the worker", reason, len(self._in_flight))
        failed = [RequestFailed(rid, reason) for rid in sorted(self._in_flight)]
        self._in_flight.clear()
        return failed

    def _restart(self) -> None:
        self._proc.join()
        self._conn.close()
        self.restarts += 1
        self.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._proc is None:
            return
        self._ready = False
        with contextlib.suppress(OSError):  # already gone is fine
            self._conn.send(("shutdown",))
        # Work still in flight was already failed by the caller; waiting for it would only let
        # the worker block on sending an MP4 that nobody reads.
        self._proc.join(0 if self._in_flight else timeout)
        self._kill()

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()
        self._conn.close()
