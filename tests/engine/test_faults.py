"""Faults against real spawned workers running the fake runner: a worker killed mid-run, a request
that raises or runs out of memory beside good ones in one batch."""

import os
import signal
import threading

import numpy as np
import pytest

from serve.engine.core import GenerationFailed
from serve.pipeline.mp4 import decode_mp4
from serve.worker.worker import _is_oom
from tests.engine.conftest import make_core
from tests.engine.fake_runner import LOAD_DELAY_ENV, fake_frames
from tests.engine.test_core import params, wait_until

TIMEOUT_S = 120  # guards hangs only


def frames_of(result) -> np.ndarray:
    return decode_mp4(result.mp4)[0]


def kinds_on(result, worker: int) -> list[str]:
    return [kind for kind, w, _ in result.trace if w == worker]


class HealthWatch:
    """Samples `core.is_healthy()` in a thread until stopped; `seen` holds every answer."""

    def __init__(self, core) -> None:
        self.core, self.seen = core, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.seen.add(self.core.is_healthy())

    def stop(self) -> set[bool]:
        self._stop.set()
        self._thread.join()
        return self.seen


def unit_in_flight(core, worker: int, kind: str, request_id: str) -> bool:
    unit = core.executor.workers[worker].unit
    return unit is not None and unit.kind == kind and request_id in unit.request_ids


def test_killed_worker_requeues_what_had_not_started_retries_the_mid_way_and_the_other_serves_on(tmp_path, monkeypatch):
    """Worker 0 holds `mid` (a step done) and `held` (encoded, no step yet) when it is SIGKILLed;
    its replacement loads far longer than the test runs, so everything after the kill happens on
    worker 1 while worker 0 reloads, and the engine stays healthy throughout."""
    core = make_core(str(tmp_path), workers=2, max_running_per_worker=2, max_batch_size=1)
    core.start()
    try:
        mid_id, mid = core.add_request(p_mid := params("sleep:6", seed=1, num_inference_steps=6))
        wait_until(lambda: core.request_state(mid_id)["worker"] == 0)
        # Worker 1 gets long work: it is the more loaded one when `held` is placed, so `held` goes to worker 0.
        busy_id, busy = core.add_request(p_busy := params("sleep:4", seed=2, num_inference_steps=40))
        wait_until(lambda: core.request_state(busy_id)["worker"] == 1)
        # another batch key: never in a step with `mid`
        held_id, held = core.add_request(p_held := params(seed=3, width=32))
        # `mid` has taken a step and runs another (a second long), `held` sits on worker 0 at step 0.
        wait_until(
            lambda: (
                core.request_state(held_id)["worker"] == 0
                and core.request_state(mid_id)["step"] >= 1
                and unit_in_flight(core, 0, "denoise", mid_id)
            )
        )
        assert core.request_state(held_id)["step"] == 0
        monkeypatch.setenv(LOAD_DELAY_ENV, "600")  # the replacement is still loading when the test ends
        health = HealthWatch(core)
        os.kill(core.executor.workers[0].proc.pid, signal.SIGKILL)

        results = {name: f.result(TIMEOUT_S) for name, f in (("mid", mid), ("held", held), ("busy", busy))}
        assert health.stop() == {True}
        assert not core.executor.workers[0].alive() and core.executor.workers[0].restarts >= 1
        for name, p in (("mid", p_mid), ("held", p_held), ("busy", p_busy)):
            np.testing.assert_array_equal(frames_of(results[name]), fake_frames(p))
        # mid: a step on worker 0, then started over on worker 1 (all six steps there, alone)
        assert kinds_on(results["mid"], 0)[:2] == ["encode", "denoise"]
        assert kinds_on(results["mid"], 1) == ["encode"] + ["denoise"] * 6 + ["decode"]
        assert kinds_on(results["held"], 0) == ["encode"]
        assert kinds_on(results["held"], 1) == ["encode"] + ["denoise"] * 3 + ["decode"]
        assert "worker 0 (cpu) is not running" in core.unready_reason()
        assert not core.ready.is_set()
    finally:
        core.stop()


def batch_behind(core, prompts: list[str]):
    """Submit a request per prompt while the worker is inside a long step of another request, so
    that they all wait and are encoded (and stepped) as one batch; their futures, and the blocker's."""
    blocker_id, blocker = core.add_request(params("sleep:6", seed=99))
    wait_until(lambda: unit_in_flight(core, 0, "denoise", blocker_id))
    futures = [core.add_request(params(prompt, seed=i))[1] for i, prompt in enumerate(prompts)]
    return futures, blocker


@pytest.fixture
def batching_core(tmp_path):
    core = make_core(str(tmp_path), max_batch_size=8, max_running_per_worker=8)
    core.start()
    yield core
    core.stop()


def test_a_raising_request_fails_alone_and_its_batch_mates_complete(batching_core):
    """One request per failing stage (text encode, a step, decode) in batches with good ones."""
    prompts = ["a cat", "raise", "a dog", "encode-raise", "a fox", "bad-shape"]
    futures, blocker = batch_behind(batching_core, prompts)
    outcomes = {}
    for prompt, future in zip(prompts, futures, strict=True):
        try:
            outcomes[prompt] = future.result(TIMEOUT_S)
        except GenerationFailed as e:
            outcomes[prompt] = e.reason
    assert outcomes["raise"] == "RuntimeError: fake runner was told to fail"
    assert outcomes["encode-raise"] == "RuntimeError: fake text encoder was told to fail"
    assert "expected uint8 (5, 32, 48, 3)" in outcomes["bad-shape"]
    for i, prompt in enumerate(prompts):
        if prompt in ("a cat", "a dog", "a fox"):
            # every step exactly once (the fake refuses to decode otherwise), and the right frames
            np.testing.assert_array_equal(frames_of(outcomes[prompt]), fake_frames(params(prompt, seed=i)))
    trace = outcomes["a cat"].trace
    assert ("encode", 0, 6) in trace  # it shared the encode that raised, a step with "raise"...
    assert any(kind == "denoise" and size >= 5 for kind, _, size in trace)
    assert any(kind == "decode" and size >= 4 for kind, _, size in trace)  # ...and the decode with "bad-shape"
    assert blocker.result(TIMEOUT_S).mp4
    assert batching_core.executor.workers[0].restarts == 0


def test_an_out_of_memory_batch_is_split_until_it_fits(batching_core):
    prompts = ["oom:1"] * 4
    futures, blocker = batch_behind(batching_core, prompts)
    results = [f.result(TIMEOUT_S) for f in futures]
    for i, result in enumerate(results):
        np.testing.assert_array_equal(frames_of(result), fake_frames(params("oom:1", seed=i)))
    assert any(kind == "denoise" and size >= 4 for kind, _, size in results[0].trace)
    assert blocker.result(TIMEOUT_S).mp4


def test_a_request_out_of_memory_alone_fails_with_what_to_change(core):
    _, future = core.add_request(params("oom:0"))
    with pytest.raises(GenerationFailed, match=r"^out of memory at 48x32, 5 frames .*lower the resolution"):
        future.result(TIMEOUT_S)
    _, after = core.add_request(params())
    assert after.result(TIMEOUT_S).mp4


def test_torch_out_of_memory_errors_are_known_by_name():
    """The worker tells an out-of-memory error by its class name (it must not import torch)."""
    torch = pytest.importorskip("torch")
    assert _is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    assert _is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert _is_oom(MemoryError())
    assert not _is_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))
