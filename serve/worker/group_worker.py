"""A worker group's ranks: the same `Worker` verbs, run by every rank of the group in lockstep.

Rank 0 holds the engine's pipe: it receives each message and broadcasts it; every rank runs it (the
forward passes inside are split across the group: serve/worker/group.py); rank 0 alone reports and
writes the videos. The other ranks have no pipe at all: the engine sees one worker per group, and
the executor watches every rank's process, so a rank's death takes the whole group down and back up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from serve.engine.messages import DecodeUnit, Free, LoadFailed, Ready, Shutdown, UnitReport
from serve.logs import configure_logging
from serve.worker.factory import WorkerArgs
from serve.worker.group_args import GroupArgs
from serve.worker.worker import Worker, _reason, import_object, memory_plan

log = logging.getLogger(__name__)


class GroupWorker(Worker):
    def __init__(self, conn: Connection | None, args: WorkerArgs, group: GroupArgs) -> None:
        super().__init__(conn, args)  # type: ignore[arg-type]  # ranks other than 0 have no pipe
        self.group = group
        self.control: Any = None  # the gloo process group that carries messages
        self.tiles_spread = False  # the VAE's tiles decode across the ranks (a collective)
        self.agreement: Any = None  # the gloo group on which the ranks compare each unit's outcome
        self.alone = False  # rank 0 decodes and stores by itself: its retries need no peer
        self.fault = _test_fault(group.rank)

    def load(self) -> bool:
        """Every rank loads the model and splits its experts; the group calibrates only when all
        ranks loaded (calibration steps are collectives); rank 0 reports Ready, or the first error."""
        from serve.worker import group as torch_group

        try:
            self.control = torch_group.join(self.group)
            self.agreement = torch_group.agreement_group(self.group)
        except Exception as e:  # no group to tell: rank 0 reports, the others just exit
            return self._failed(f"rank {self.group.rank} could not join its group: {_reason(e)}")
        error = self._build()
        try:
            errors = [e for e in torch_group.gather(error, self.control) if e is not None]
        except Exception as e:  # a peer died while loading: say so, rather than exit without a word
            return self._failed(error or f"rank {self.group.rank} lost its group while loading: {_reason(e)}")
        if errors:
            self._failed(errors[0])
            with contextlib.suppress(Exception):  # peers exit after rank 0 has told why, not before
                torch_group.barrier(self.control)
            return False
        try:
            samples = self.runner.calibrate() if self.args.calibrate else []
        except Exception as e:
            log.error("calibration failed:\n%s", traceback.format_exc())
            return self._failed(f"rank {self.group.rank}: {_reason(e)}")
        if self.group.leader:
            samples = tuple(tuple(s) for s in samples)
            self.conn.send(Ready(self.args.device, self.args.dtype, samples, memory_plan(self.runner)))
        return True

    def _build(self) -> str | None:
        """Load this rank's runner on its device and split its forwards; why not, if it failed."""
        from serve.worker import group as torch_group

        try:
            factory = import_object(self.args.runner_factory)
            options = dataclasses.replace(self.args.options, group=(self.group.ulysses, self.group.cfg))
            self.runner = factory(self.args.model_dir, self.group.device, self.args.dtype, options)
            self.tiles_spread = torch_group.parallelize(self.runner, self.group, self.control)
        except Exception as e:
            log.error("rank %d failed to load the model:\n%s", self.group.rank, traceback.format_exc())
            return f"rank {self.group.rank} ({self.group.device}): {_reason(e)}"
        return None

    def _failed(self, reason: str) -> bool:
        if self.group.leader:
            self.conn.send(LoadFailed(reason))
        return False

    def receive(self) -> Any:
        """The next message, on every rank: rank 0 reads the pipe and broadcasts it."""
        from serve.worker import group as torch_group

        message = None
        if self.group.leader:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the engine is gone: the peers must stop too
                message = Shutdown()
        return torch_group.broadcast(message, self.control)

    def agree(self, outcome: Any) -> None:
        """Every rank's `outcome` of the same work must be equal: a rank that raised alone has
        states that differ from its peers', or left them waiting in a collective it never joined.
        If not (or a peer does not answer within `agree_timeout_s`), every rank exits non-zero and
        the executor restarts the group; its requests are retried from their seed (engine rule)."""
        from serve.worker import group as torch_group

        try:
            outcomes = torch_group.gather(outcome, self.agreement)
        except Exception as e:
            _exit_out_of_step(f"rank {self.group.rank} got no answer from its peers ({_reason(e)}); it had {outcome}")
        if any(o != outcomes[0] for o in outcomes):
            _exit_out_of_step(f"the ranks' outcomes of one unit differ, rank by rank: {outcomes}")

    def _isolating(self, ids, run, params, pending, reason=_reason):
        """The worker's isolating retries, but a try that raised is compared across the ranks first:
        the group retries together only when every rank raised at the same try."""
        if self.alone:
            return super()._isolating(ids, run, params, pending, reason)

        def together(part: list[str]) -> None:
            try:
                run(part)
                if self.fault is not None and any(params[rid].prompt == self.fault for rid in part):
                    _fire_test_fault()
            except Exception:
                self.agree(("raised", run.__name__, tuple(part)))
                raise

        together.__name__ = run.__name__
        return super()._isolating(ids, together, params, pending, reason)

    def run_unit(self, unit: Any) -> UnitReport:
        report = super().run_unit(unit)
        if not isinstance(unit, DecodeUnit):  # a decode's storage is rank 0's alone
            self.agree(("done", tuple(sorted(report.failed))))
        return report

    def decode(self, unit: DecodeUnit) -> UnitReport:
        """Rank 0 decodes and stores the videos; the others only let the requests go, or, when the
        VAE's tiles are spread over the group, first decode their share of every chunk with it."""
        if not self.tiles_spread:
            return self._decode_alone(unit) if self.group.leader else self._let_go(unit)
        states = [self.states[rid] for rid in unit.request_ids]
        try:
            chunks = list(self.runner.decode_chunks(states))  # every rank, in lockstep
        except Exception as e:
            log.error("decode of %d request(s) failed:\n%s", len(states), traceback.format_exc())
            self.agree(("decode raised",))
            self.free(unit.request_ids)
            return UnitReport(unit.unit_id, failed=dict.fromkeys(unit.request_ids, _reason(e)))
        self.agree(("decoded",))
        if not self.group.leader:
            return self._let_go(unit)
        log.info("decoded %d video(s) with their VAE tiles spread over %d ranks", len(states), self.group.world_size)
        # The MP4s are written from the decoded frames, so a storage failure's retries (the
        # worker's `_isolating`) decode nothing again and need no peer.
        runner, self.runner = self.runner, _Decoded(self.runner, states, chunks)
        try:
            return self._decode_alone(unit)
        finally:
            self.runner = runner

    def _decode_alone(self, unit: DecodeUnit) -> UnitReport:
        self.alone = True
        try:
            return super().decode(unit)
        finally:
            self.alone = False

    def _let_go(self, unit: DecodeUnit) -> UnitReport:
        self.free(unit.request_ids)
        return UnitReport(unit.unit_id)

    def serve(self) -> None:
        while self.running:
            message = self.receive()
            if isinstance(message, Free):
                self.free(message.request_ids)
            elif isinstance(message, Shutdown):
                self.running = False
            else:
                report = self.run_unit(message)
                if self.group.leader:
                    self.conn.send(report)


def _exit_out_of_step(why: str) -> NoReturn:
    """Leave the group at once: its collectives are out of step, and only a restart mends that."""
    log.error("worker group out of step, exiting for a restart: %s", why)
    logging.shutdown()
    os._exit(1)


TEST_FAULT_ENV = "REELSERVE_TEST_RANK_FAULT"
"""Tests only: `<rank>:<prompt>:<marker file>` makes that rank alone raise once, after a stage of a
request with that prompt ran (the first time: it creates the marker)."""


def _test_fault(rank: int) -> str | None:
    spec = os.environ.get(TEST_FAULT_ENV)
    if not spec:
        return None
    fault_rank, prompt, _ = spec.split(":", 2)
    return prompt if int(fault_rank) == rank else None


def _fire_test_fault() -> None:
    marker = os.environ[TEST_FAULT_ENV].split(":", 2)[2]
    with contextlib.suppress(FileExistsError):
        open(marker, "x").close()
        raise RuntimeError("test fault: this rank alone raised")


class _Decoded:
    """The runner, but `decode_chunks` of any of `states` reads the chunks decoded already."""

    def __init__(self, runner: Any, states: list[Any], chunks: list[Any]) -> None:
        self.runner, self.chunks = runner, chunks
        self.rows = {id(s): i for i, s in enumerate(states)}

    def decode_chunks(self, states: list[Any]) -> Iterator[Any]:
        rows = [self.rows[id(s)] for s in states]
        return (chunk[rows] for chunk in self.chunks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)


def group_worker_main(conn: Connection | None, args: WorkerArgs, group: GroupArgs) -> None:
    """Entry point of one rank's spawned process."""
    from serve.worker import group as torch_group

    configure_logging(args.log_format, args.log_level, process=f"rank {group.rank}")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    worker = GroupWorker(conn, args, group)
    loaded = worker.load()
    if loaded:
        worker.serve()
    torch_group.leave()
    if conn is not None:
        conn.close()
    if not loaded:
        sys.exit(1)  # the executor, watching every rank while the group loads, sees a failed rank
