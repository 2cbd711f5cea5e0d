"""Worker processes, one per device: start them, send them units, collect reports, restart the dead.

Only the EngineCore thread calls into an executor (start/stop excepted), so it needs no locks;
`is_ready` is safe from any thread.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing as mp
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from serve.engine.messages import Free, LoadFailed, Ready, Shutdown, UnitReport, unit_message
from serve.engine.request import GenerationParams
from serve.engine.scheduler import UnitResult, WorkerDied, WorkUnit
from serve.worker.factory import WorkerArgs
from serve.worker.worker import worker_main

log = logging.getLogger(__name__)

# spawn, never fork: a forked child would inherit the server's threads and any CUDA state.
_MP = mp.get_context("spawn")


class WorkerStartError(RuntimeError):
    """A worker could not load the model; the message says why and what to check."""


@dataclass(frozen=True)
class UnitOutcome:
    """A finished unit: the scheduler's view (`result`) and the payload (`report`: artifact keys)."""

    result: UnitResult
    report: UnitReport


@dataclass
class WorkerHandle:
    index: int
    args: WorkerArgs
    proc: mp.process.BaseProcess | None = None
    conn: Connection | None = None
    ready: bool = False
    restarts: int = 0
    unit: WorkUnit | None = None  # in flight
    unit_id: int | None = None
    info: Ready | None = None

    def alive(self) -> bool:
        proc = self.proc
        return self.ready and proc is not None and not wait([proc.sentinel], timeout=0)


class Executor:
    def __init__(self, worker_args: list[WorkerArgs], start_timeout_s: float = 600.0) -> None:
        self.workers = [WorkerHandle(i, args) for i, args in enumerate(worker_args)]
        self.start_timeout_s = start_timeout_s
        self._unit_ids = itertools.count(1)
        self.last_error: str | None = None  # why the last restart failed, for /health

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn every worker, then wait for all to load (in parallel: N devices load at once)."""
        for w in self.workers:
            self._spawn(w)
        try:
            for w in self.workers:
                self._await_ready(w)
        except WorkerStartError:
            self.stop()
            raise

    def _spawn(self, w: WorkerHandle) -> None:
        w.ready, w.unit, w.unit_id = False, None, None
        parent, child = _MP.Pipe()
        w.proc = _MP.Process(target=worker_main, args=(child, w.args), name=f"reelserve-worker-{w.index}", daemon=True)
        w.proc.start()
        child.close()  # keep only the worker's copy, so its death shows here as EOF
        w.conn = parent

    def _await_ready(self, w: WorkerHandle) -> None:
        where = f"worker {w.index} ({w.args.device})"
        if not w.conn.poll(self.start_timeout_s):
            self._kill(w)
            raise WorkerStartError(
                f"{where} did not load {w.args.model_dir} within {self.start_timeout_s:.0f}s; "
                "raise worker_start_timeout_s or check the worker log"
            )
        try:
            message = w.conn.recv()
        except (EOFError, OSError):
            w.proc.join(5)
            raise WorkerStartError(f"{where} exited (code {w.proc.exitcode}) while loading; see its log") from None
        if not isinstance(message, Ready):
            self._kill(w)
            reason = message.reason if isinstance(message, LoadFailed) else f"unexpected {message!r}"
            raise WorkerStartError(f"{where} could not load {w.args.model_dir}: {reason}")
        w.ready, w.info = True, message
        log.info("worker %d pid %s ready on %s", w.index, w.proc.pid, w.args.device)

    def restart_dead(self) -> None:
        """Start a fresh process for each dead worker (blocks while it loads)."""
        for w in self.workers:
            if not w.ready and w.proc is not None:
                w.proc.join()
                w.conn.close()
                w.restarts += 1
                self._spawn(w)
                try:
                    self._await_ready(w)
                except WorkerStartError as e:
                    self.last_error = str(e)
                    log.error("restart failed: %s", e)

    def stop(self, timeout: float = 10.0) -> None:
        for w in self.workers:
            if w.proc is None:
                continue
            w.ready = False
            with contextlib.suppress(OSError):  # already gone is fine
                w.conn.send(Shutdown())
        for w in self.workers:
            if w.proc is not None:
                # A unit still in flight was already failed by the caller; waiting would only let
                # the worker block on sending an MP4 that nobody reads.
                w.proc.join(0 if w.unit else timeout)
                self._kill(w)

    def _kill(self, w: WorkerHandle) -> None:
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join()
        w.conn.close()

    # ---- work -----------------------------------------------------------------------------------

    def idle_workers(self) -> list[int]:
        return [w.index for w in self.workers if w.ready and w.unit is None]

    def has_dead(self) -> bool:
        return any(not w.ready for w in self.workers)

    def any_ready(self) -> bool:
        return any(w.alive() for w in self.workers)

    def submit(
        self, unit: WorkUnit, params: tuple[tuple[str, GenerationParams], ...] = (), outputs: tuple[str, ...] = ()
    ) -> None:
        """Send a unit to its worker; an encode unit carries its requests' `params` and the
        artifact store each one's MP4 goes to (`outputs`)."""
        w = self.workers[unit.worker]
        w.unit, w.unit_id = unit, next(self._unit_ids)
        message = unit_message(unit.kind, w.unit_id, unit.request_ids, unit.expert, params, outputs)
        with contextlib.suppress(OSError):  # a dead worker refuses; poll() reports its death
            w.conn.send(message)

    def free(self, worker: int, request_ids: list[str]) -> None:
        w = self.workers[worker]
        if w.ready:
            with contextlib.suppress(OSError):
                w.conn.send(Free(tuple(request_ids)))

    def poll(self, timeout: float) -> list[UnitOutcome | WorkerDied]:
        """Wait up to `timeout` for any worker to report; return finished units and deaths."""
        live = [w for w in self.workers if w.ready]
        wait([x for w in live for x in (w.conn, w.proc.sentinel)], timeout)
        events: list[UnitOutcome | WorkerDied] = []
        for w in live:
            events += self._drain(w)
        return events

    def _drain(self, w: WorkerHandle) -> list[UnitOutcome | WorkerDied]:
        events: list[UnitOutcome | WorkerDied] = []
        try:
            while w.conn.poll():
                report = w.conn.recv()
                if isinstance(report, UnitReport) and report.unit_id == w.unit_id:
                    events.append(UnitOutcome(self._result(w.unit, report), report))
                    w.unit, w.unit_id = None, None
        except (EOFError, OSError):
            pass  # the worker closed its end; the liveness check below handles it
        if not w.alive():
            events.append(self._died(w))
        return events

    @staticmethod
    def _result(unit: WorkUnit, report: UnitReport) -> UnitResult:
        return UnitResult(unit, failed=report.failed, experts=report.experts, elapsed_s=report.elapsed_s)

    def _died(self, w: WorkerHandle) -> WorkerDied:
        w.ready, w.unit, w.unit_id = False, None, None
        w.proc.join()
        reason = f"worker process died (worker {w.index}, exit code {w.proc.exitcode}) while holding this request"
        log.error("%s; restarting it", reason)
        return WorkerDied(w.index, reason)
