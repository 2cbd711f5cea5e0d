"""Worker processes, one per device: start them, send them units, collect reports, restart the dead.

A worker may be a group of ranks (one process per device, serve/worker/group_worker.py): the
engine talks to rank 0 alone, and every rank's process is watched, so the death of any rank is the
death of the worker, and a restart restarts the whole group.

Only the EngineCore thread calls into an executor (start/stop excepted), so it needs no locks;
`any_ready` and `unready` only read, and are safe from any thread.

A restart never blocks that thread: `restart_dead` spawns the process and returns, and
`collect_restarts` (each loop iteration) takes it in once it reports Ready, so the other workers
keep serving while it loads.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from serve.engine.messages import DecodeAccepted, Free, LoadFailed, Ready, Shutdown, UnitReport, unit_message
from serve.engine.request import GenerationParams
from serve.engine.scheduler import MovedToLane, UnitResult, WorkerDied, WorkUnit
from serve.worker.factory import WorkerArgs
from serve.worker.group_args import GroupArgs, fresh_address
from serve.worker.group_worker import group_worker_main
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
    lane: dict[int, WorkUnit] = field(default_factory=dict)  # unit id -> decode on the worker's decode lane
    info: Ready | None = None
    loading_since: float | None = None  # monotonic time its (re)start was spawned, until it is Ready
    error: str | None = None  # why its last restart failed
    group: GroupArgs | None = None  # a group of ranks: `proc` is rank 0, `peers` the others
    peers: list[mp.process.BaseProcess] = field(default_factory=list)

    @property
    def where(self) -> str:
        if self.group is not None:
            return f"worker group {self.index} ({','.join(self.group.devices)})"
        return f"worker {self.index} ({self.args.device})"

    def processes(self) -> list[mp.process.BaseProcess]:
        return [p for p in (self.proc, *self.peers) if p is not None]

    def alive(self) -> bool:
        procs = self.processes()
        return self.ready and self.proc is not None and not wait([p.sentinel for p in procs], timeout=0)


class Executor:
    def __init__(
        self,
        worker_args: list[WorkerArgs],
        start_timeout_s: float = 600.0,
        groups: list[GroupArgs | None] | None = None,
    ) -> None:
        """`groups[i]`: worker i is that group of ranks (None, or no `groups`: one process)."""
        groups = groups or [None] * len(worker_args)
        self.workers = [
            WorkerHandle(i, args, group=g) for i, (args, g) in enumerate(zip(worker_args, groups, strict=True))
        ]
        self.start_timeout_s = start_timeout_s
        self._unit_ids = itertools.count(1)

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
        w.lane.clear()
        parent, child = _MP.Pipe()
        if w.group is None:
            w.proc = _MP.Process(
                target=worker_main, args=(child, w.args), name=f"reelserve-worker-{w.index}", daemon=True
            )
        else:
            w.proc, w.peers = self._spawn_group(w, child)
        for proc in w.processes():
            proc.start()
        child.close()  # keep only the worker's copy, so its death shows here as EOF
        w.conn = parent
        w.loading_since = time.monotonic()

    @staticmethod
    def _spawn_group(w: WorkerHandle, child: Connection) -> tuple[mp.process.BaseProcess, list[mp.process.BaseProcess]]:
        """Rank 0 (with the pipe) and its peers (without), meeting at a fresh address."""
        address = fresh_address()
        procs = [
            _MP.Process(
                target=group_worker_main,
                args=(child if rank == 0 else None, w.args, w.group.for_rank(rank, address)),
                name=f"reelserve-worker-{w.index}-rank-{rank}",
                daemon=True,
            )
            for rank in range(w.group.world_size)
        ]
        return procs[0], procs[1:]

    def _await_ready(self, w: WorkerHandle) -> None:
        """Block until `w` has loaded (at start, before the engine loop runs), or until one of its
        processes exits: a group's peer that dies leaves rank 0 waiting in a collective."""
        deadline = time.monotonic() + self.start_timeout_s
        while not w.conn.poll(0):
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill(w)
                raise self._too_slow(w)
            wait([w.conn, *(p.sentinel for p in w.processes())], left)
            self._check_loading_processes(w, grace_s=self._LOAD_FAILED_GRACE_S)
        self._take_in(w)

    _LOAD_FAILED_GRACE_S = 5.0
    """How long rank 0 may take to report a peer's load failure after the peer exited."""

    def _check_loading_processes(self, w: WorkerHandle, grace_s: float = 0.0) -> None:
        """While `w` loads: if one of its processes has exited and no message is waiting, kill the
        rest and fail the load naming the rank, its device and its exit code. Rank 0 reports a
        failure it knows of (its peers wait for that at a barrier before they exit); `grace_s` lets
        that message arrive at start-up; a restart (engine thread) does not block for it."""
        if w.group is None or not self._exited(w.processes()) or w.conn.poll(grace_s):
            return
        rank, proc = self._blamed_rank(w)
        self._kill(w)
        raise WorkerStartError(
            f"{w.where}: rank {rank} on {w.group.devices[rank]} exited (code {proc.exitcode}) while loading; "
            "the group was stopped; see that rank's log"
        )

    @staticmethod
    def _exited(procs: list[mp.process.BaseProcess]) -> list[mp.process.BaseProcess]:
        return [p for p in procs if wait([p.sentinel], timeout=0)]

    def _too_slow(self, w: WorkerHandle) -> WorkerStartError:
        return WorkerStartError(
            f"{w.where} did not load {w.args.model_dir} within {self.start_timeout_s:.0f}s; "
            "raise worker_start_timeout_s or check the worker log"
        )

    def _take_in(self, w: WorkerHandle) -> None:
        """Read the loading worker's first message (it has one, or has exited): Ready, or why not."""
        try:
            message = w.conn.recv()
        except (EOFError, OSError):
            w.proc.join(5)
            self._kill(w)
            raise WorkerStartError(f"{w.where} exited (code {w.proc.exitcode}) while loading; see its log") from None
        if not isinstance(message, Ready):
            self._kill(w)
            reason = message.reason if isinstance(message, LoadFailed) else f"unexpected {message!r}"
            raise WorkerStartError(f"{w.where} could not load {w.args.model_dir}: {reason}")
        w.ready, w.info, w.loading_since, w.error = True, message, None, None
        log.info("worker %d pid %s ready on %s", w.index, w.proc.pid, w.args.device)

    def restart_dead(self) -> None:
        """Spawn a fresh process for each dead worker and return at once (`collect_restarts`)."""
        for w in self.workers:
            if self._needs_restart(w):
                self._kill(w)  # dead already, or alive but no longer answering: join() must not hang
                w.restarts += 1
                self._spawn(w)

    def collect_restarts(self) -> None:
        """Take in restarted workers that have loaded; give up on one that failed or is too slow
        (it is dead again, and restarted after the engine's backoff)."""
        now = time.monotonic()
        for w in self.workers:
            if w.loading_since is None:
                continue
            try:
                self._check_loading_processes(w)
                if w.conn.poll():
                    self._take_in(w)
                elif now - w.loading_since > self.start_timeout_s:
                    self._kill(w)
                    raise self._too_slow(w)
            except WorkerStartError as e:
                w.loading_since, w.error = None, str(e)
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
                # the worker block on sending an MP4 that nobody reads. One still loading has
                # nothing to finish. A group's peers stop with rank 0 (it broadcasts the Shutdown).
                for proc in w.processes():
                    proc.join(0 if w.unit or w.lane or w.loading_since is not None else timeout)
                self._kill(w)
                w.loading_since = None

    def _kill(self, w: WorkerHandle) -> None:
        for proc in w.processes():
            if proc.is_alive():
                proc.kill()
        for proc in w.processes():
            proc.join()
        w.conn.close()

    # ---- work -----------------------------------------------------------------------------------

    def idle_workers(self) -> list[int]:
        return [w.index for w in self.workers if w.ready and w.unit is None]

    @staticmethod
    def _needs_restart(w: WorkerHandle) -> bool:
        return not w.ready and w.loading_since is None and w.proc is not None

    def has_dead(self) -> bool:
        """A worker is dead and not being restarted."""
        return any(self._needs_restart(w) for w in self.workers)

    def loading(self) -> bool:
        """A restarted worker is loading."""
        return any(w.loading_since is not None for w in self.workers)

    def any_ready(self) -> bool:
        return any(w.alive() for w in self.workers)

    def unready(self) -> list[str]:
        """A line for each worker that cannot take work now, saying why (for /ready and /health)."""
        now, lines = time.monotonic(), []
        for w in list(self.workers):
            if w.alive():
                continue
            since, error = w.loading_since, w.error  # one read each: the engine thread writes them
            if since is not None:
                lines.append(f"{w.where} is not running (restarting: loading the model, {now - since:.0f}s so far)")
            elif error is not None:
                lines.append(f"{w.where} is not running (its last restart failed, retrying: {error})")
            else:
                lines.append(f"{w.where} is not running (restarting)")
        return lines

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

    def poll(self, timeout: float) -> list[UnitOutcome | WorkerDied | MovedToLane]:
        """Wait up to `timeout` for any worker to report; return finished units and deaths."""
        live = [w for w in self.workers if w.ready]
        # wake up for their Ready, or a rank's death while loading
        loading = [x for w in self.workers if w.loading_since is not None for x in (w.conn, *self._sentinels(w))]
        wait([x for w in live for x in (w.conn, *(p.sentinel for p in w.processes()))] + loading, timeout)
        events: list[UnitOutcome | WorkerDied | MovedToLane] = []
        for w in live:
            events += self._drain(w)
        return events

    def _drain(self, w: WorkerHandle) -> list[UnitOutcome | WorkerDied | MovedToLane]:
        events: list[UnitOutcome | WorkerDied | MovedToLane] = []
        try:
            while w.conn.poll():
                report = w.conn.recv()
                if w.group is not None and not w.alive():
                    # A rank died and rank 0 reports what broke in the collectives it was in: the
                    # death (below) is the cause, and its requests are the scheduler's to retry.
                    continue
                if isinstance(report, DecodeAccepted) and report.unit_id == w.unit_id:
                    w.lane[w.unit_id] = w.unit  # the worker is free for the next unit
                    events.append(MovedToLane(w.unit))
                    w.unit, w.unit_id = None, None
                elif isinstance(report, UnitReport) and report.unit_id == w.unit_id:
                    events.append(UnitOutcome(self._result(w.unit, report), report))
                    w.unit, w.unit_id = None, None
                elif isinstance(report, UnitReport) and report.unit_id in w.lane:
                    events.append(UnitOutcome(self._result(w.lane.pop(report.unit_id), report, on_lane=True), report))
        except (EOFError, OSError):
            pass  # the worker closed its end; the liveness check below handles it
        if not w.alive():
            events.append(self._died(w))
        return events

    @staticmethod
    def _result(unit: WorkUnit, report: UnitReport, on_lane: bool = False) -> UnitResult:
        return UnitResult(
            unit, failed=report.failed, experts=report.experts, elapsed_s=report.elapsed_s, on_lane=on_lane
        )

    def _died(self, w: WorkerHandle) -> WorkerDied:
        w.ready, w.unit, w.unit_id = False, None, None
        w.lane.clear()
        if w.group is None:
            w.proc.join()
            reason = f"worker process died (worker {w.index}, exit code {w.proc.exitcode}) while holding this request"
        else:
            reason = self._group_death(w)
        log.error("%s; restarting it", reason)
        return WorkerDied(w.index, reason)

    @staticmethod
    def _sentinels(w: WorkerHandle) -> list[int]:
        """A loading group's processes (a single worker's death shows as EOF on its pipe)."""
        return [p.sentinel for p in w.processes()] if w.group is not None else []

    @classmethod
    def _blamed_rank(cls, w: WorkerHandle) -> tuple[int, mp.process.BaseProcess]:
        """The rank whose death is the cause, of those gone: one killed by a signal (exit code < 0:
        the others died of its death, in a collective that broke), else one that exited with an
        error, else the lowest. A sentinel fires before the process can be reaped, hence the join."""
        gone = [(r, p) for r, p in enumerate(w.processes()) if wait([p.sentinel], timeout=0)]
        for _, proc in gone:
            proc.join()
        return min(gone, key=lambda rp: (not rp[1].exitcode or rp[1].exitcode > 0, rp[1].exitcode == 0, rp[0]))

    @classmethod
    def _group_death(cls, w: WorkerHandle) -> str:
        """Which rank died (`_blamed_rank`), for the requests it held."""
        rank, proc = cls._blamed_rank(w)
        return (
            f"worker process died (worker group {w.index}: rank {rank} on {w.group.devices[rank]}, "
            f"exit code {proc.exitcode}; the group restarts as a whole) while holding this request"
        )
