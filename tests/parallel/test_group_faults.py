"""A rank killed mid-step: the group's requests are handed back with the death's reason, the group
restarts as a whole and serves again, and another worker serves throughout (real processes)."""

import logging
import os
import signal

import numpy as np
import pytest

from serve.engine.executor import Executor, WorkerHandle, WorkerStartError
from serve.pipeline.mp4 import decode_mp4
from serve.worker.factory import WorkerArgs
from serve.worker.group_args import GroupArgs
from serve.worker.group_worker import TEST_FAULT_ENV
from serve.worker.model_runner import ModelRunner
from tests.engine.test_core import wait_until
from tests.parallel.conftest import TIMEOUT_S, group_core, request


@pytest.fixture
def core(tiny_model_dir, tmp_path, monkeypatch, outputs_dir):
    """Worker 0: a group of two ranks (Ulysses 2); worker 1: one process. One request each at a time.
    The group's rank 1 raises alone, once, on the first stage of a request prompted "rank fault"."""
    monkeypatch.setenv(TEST_FAULT_ENV, f"1:rank fault:{tmp_path / 'fired'}")
    engine = group_core(str(tiny_model_dir), [(2, 1), None], outputs_dir, max_running_per_worker=1, max_batch_size=1)
    engine.start()
    yield engine
    engine.stop()


def in_step_on_group(core, request_id: str) -> bool:
    unit = core.executor.workers[0].unit
    state = core.request_state(request_id) or {}
    return state.get("step", 0) >= 1 and unit is not None and unit.kind == "denoise" and request_id in unit.request_ids


def test_a_killed_rank_restarts_its_group_and_the_other_worker_serves_on(core, tiny_model_dir, caplog):
    runner = ModelRunner.from_checkpoint(tiny_model_dir)
    long_ones = [request(seed=20, steps=16), request(seed=21, steps=16, prompt="a blue dog")]
    ids_futures = [core.add_request(p) for p in long_ones]
    wait_until(lambda: all((core.request_state(i) or {}).get("worker") is not None for i, _ in ids_futures), TIMEOUT_S)
    on_group = next(k for k, (i, _) in enumerate(ids_futures) if core.request_state(i)["worker"] == 0)
    wait_until(lambda: in_step_on_group(core, ids_futures[on_group][0]), TIMEOUT_S)
    group = core.executor.workers[0]
    with caplog.at_level(logging.ERROR, logger="serve.engine.executor"):
        os.kill(group.peers[0].pid, signal.SIGKILL)
        results = [future.result(TIMEOUT_S) for _, future in ids_futures]
    assert any("worker group 0: rank 1" in r.getMessage() and "exit code -9" in r.getMessage() for r in caplog.records)
    # The killed request started over from its seed (on whichever worker was free): the same video.
    for p, result in zip(long_ones, results, strict=True):
        np.testing.assert_array_equal(decode_mp4(result.mp4)[0], runner.generate(p).frames)
    other = results[1 - on_group]
    assert {w for _, w, _ in other.trace} == {1}  # never touched by the group's death
    wait_until(lambda: group.restarts == 1 and group.alive(), TIMEOUT_S)
    after = [core.add_request(request(seed=30 + k)) for k in range(2)]  # one per worker: each holds one
    traces = [future.result(TIMEOUT_S).trace for _, future in after]
    assert any({w for _, w, _ in t} == {0} for t in traces)  # the restarted group served one of them

    # One rank raises alone (the other finished the stage): the ranks compare each unit's outcome,
    # find them out of step, and all exit; the group restarts and the request is retried from its seed.
    faulty = [request(seed=40 + k, prompt="rank fault") for k in range(2)]  # one per worker again
    with caplog.at_level(logging.ERROR, logger="serve.engine.executor"):
        results = [future.result(TIMEOUT_S) for _, future in (core.add_request(p) for p in faulty)]
    assert any("worker group 0: rank" in r.getMessage() and "exit code 1" in r.getMessage() for r in caplog.records)
    for p, result in zip(faulty, results, strict=True):
        np.testing.assert_array_equal(decode_mp4(result.mp4)[0], runner.generate(p).frames)
    wait_until(lambda: group.restarts == 2 and group.alive(), TIMEOUT_S)


def test_a_rank_that_dies_while_loading_fails_the_start_at_once_naming_it(tiny_model_dir):
    """Rank 1 cannot join (no such device on this host) and exits; rank 0 would wait for it at the
    rendezvous for the group's whole timeout: the executor watches every rank while loading."""
    args = WorkerArgs(str(tiny_model_dir), calibrate=False, torch_threads=1)
    executor = Executor([args], start_timeout_s=TIMEOUT_S, groups=[GroupArgs(("cpu", "cuda:7"), 2, 1)])
    with pytest.raises(WorkerStartError, match=r"rank 1 on cuda:7 exited \(code 1\) while loading"):
        executor.start()
    assert not any(p.is_alive() for p in executor.workers[0].processes())


class _Ended:
    """A process that has ended with `exitcode` (its sentinel is readable), or runs on (None)."""

    def __init__(self, exitcode: int | None) -> None:
        read, write = os.pipe()
        if exitcode is not None:
            os.close(write)  # EOF: readable, as an ended process's sentinel is
        self.sentinel, self.exitcode = read, exitcode

    def join(self, timeout=None) -> None:
        pass


@pytest.mark.parametrize(
    ("codes", "blamed"),
    [((1, -9, None), 1), ((1, 0, -15), 2), ((0, 1, None), 1), ((None, 0, 0), 1)],
)
def test_a_group_death_blames_a_killed_rank_else_one_that_failed(codes, blamed):
    """Rank 0 dying of a collective broken by rank 1's SIGKILL is not the cause."""
    procs = [_Ended(code) for code in codes]
    w = WorkerHandle(0, WorkerArgs("m"), proc=procs[0], peers=procs[1:], group=GroupArgs(("cpu",) * 3, 3, 1))
    rank, _ = Executor._blamed_rank(w)
    assert rank == blamed
