"""EngineCore + WorkerExecutor against a real spawned worker running the fake runner."""

import os
import signal
import time

import numpy as np
import pytest

from serve.engine.core import EngineUnavailable, GenerationFailed, QueueFull
from serve.engine.executor import WorkerStartError
from serve.engine.request import GenerationParams
from serve.pipeline.mp4 import decode_mp4
from tests.engine.conftest import make_core
from tests.engine.fake_runner import BROKEN_FACTORY, LOAD_FAIL_ENV, fake_frames

TIMEOUT_S = 30


def params(prompt: str = "a red square", seed: int = 7, **overrides) -> GenerationParams:
    values = dict(
        prompt=prompt,
        negative_prompt="",
        height=32,
        width=48,
        num_frames=5,
        fps=8,
        num_inference_steps=3,
        guidance_scale=4.0,
        guidance_scale_2=3.0,
        seed=seed,
        lossless=True,
    )
    return GenerationParams(**{**values, **overrides})


def worker_pid(core) -> int:
    return core.executor.workers[0].proc.pid


def wait_until(condition, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


def test_result_is_the_runners_frames_as_mp4_with_stage_timings(core):
    p = params(seed=11)
    _, future = core.add_request(p)
    result = future.result(TIMEOUT_S)
    frames, fps = decode_mp4(result.mp4)
    np.testing.assert_array_equal(frames, fake_frames(p))
    assert fps == 8
    assert set(result.timings) == {"queue", "text_encode", "denoise", "decode", "mp4"}
    assert result.timings["queue"] >= 0 and result.timings["mp4"] > 0


def test_runner_exception_fails_only_that_request(core):
    pid = worker_pid(core)
    _, bad = core.add_request(params("raise"))
    with pytest.raises(GenerationFailed, match="RuntimeError: fake runner was told to fail"):
        bad.result(TIMEOUT_S)
    _, good = core.add_request(params())
    assert good.result(TIMEOUT_S).mp4
    assert worker_pid(core) == pid and core.executor.workers[0].restarts == 0


def test_wrong_frame_shape_from_runner_fails_the_request(core):
    _, future = core.add_request(params("bad-shape"))
    with pytest.raises(GenerationFailed, match=r"expected uint8 \(5, 32, 48, 3\)"):
        future.result(TIMEOUT_S)


def test_request_that_kills_its_worker_is_retried_once_then_fails_with_the_reason(core):
    old_pid = worker_pid(core)
    _, dying = core.add_request(params("exit"))
    _, queued = core.add_request(params(seed=3))  # waiting behind it; must survive both restarts
    with pytest.raises(GenerationFailed, match=r"worker process died \(worker 0, exit code 3\).*retried once"):
        dying.result(TIMEOUT_S)
    result = queued.result(TIMEOUT_S)
    np.testing.assert_array_equal(decode_mp4(result.mp4)[0], fake_frames(params(seed=3)))
    assert core.executor.workers[0].restarts == 2 and worker_pid(core) != old_pid
    assert core.is_healthy()


def test_worker_killed_while_idle_is_restarted_and_unhealthy_meanwhile(core, monkeypatch):
    monkeypatch.setenv("REELSERVE_FAKE_LOAD_DELAY_S", "1.5")  # the replacement loads slowly
    old_pid = worker_pid(core)
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: not core.is_healthy())
    assert "not running" in core.health_reason()
    wait_until(lambda: not core.ready.is_set())  # /ready: 503 while it reloads
    wait_until(core.is_healthy)
    wait_until(core.ready.is_set)  # and 200 again once it is back
    assert worker_pid(core) != old_pid
    _, future = core.add_request(params())
    assert future.result(TIMEOUT_S).mp4


def test_worker_that_cannot_come_back_makes_the_engine_unavailable_until_it_does(core, monkeypatch):
    monkeypatch.setenv(LOAD_FAIL_ENV, "1")
    _, running = core.add_request(params("sleep:5"))
    wait_until(lambda: core.snapshot()["running"])
    os.kill(worker_pid(core), signal.SIGKILL)
    wait_until(lambda: "fake load failure" in (core.health_reason() or ""))
    with pytest.raises(EngineUnavailable, match="RuntimeError: fake load failure"):
        core.add_request(params())
    assert not running.done()  # back in the queue, waiting for a worker
    monkeypatch.delenv(LOAD_FAIL_ENV)  # the next retry (after the backoff) succeeds
    wait_until(core.is_healthy)
    assert running.result(TIMEOUT_S).mp4  # started over on the new worker
    _, future = core.add_request(params())
    assert future.result(TIMEOUT_S).mp4


def test_queue_full_is_refused_at_once(tmp_path):
    core = make_core(str(tmp_path), max_queue=1, max_running_per_worker=1)
    core.start()
    try:
        _, running = core.add_request(params("sleep:1"))
        wait_until(lambda: core.snapshot()["running"])
        _, waiting = core.add_request(params())
        start = time.monotonic()
        with pytest.raises(QueueFull) as refused:
            core.add_request(params())
        assert time.monotonic() - start < 0.1
        assert refused.value.retry_after_s >= 1
        assert running.result(TIMEOUT_S).mp4 and waiting.result(TIMEOUT_S).mp4
        _, again = core.add_request(params())  # room again once the queue drained
        assert again.result(TIMEOUT_S).mp4
    finally:
        core.stop()


def test_cancelled_waiting_request_leaves_the_queue(core):
    _, running = core.add_request(params("sleep:0.5"))
    wait_until(lambda: core.snapshot()["running"])
    request_id, waiting = core.add_request(params())
    assert core.snapshot()["waiting"] == [request_id]
    assert waiting.cancel()
    wait_until(lambda: core.snapshot()["waiting"] == [])  # dropped at the next loop iteration
    assert request_id not in core.snapshot()["running"]
    assert running.result(TIMEOUT_S).mp4


def test_stop_fails_pending_requests_and_refuses_new_ones(tmp_path):
    core = make_core(str(tmp_path))
    core.start()
    _, running = core.add_request(params("sleep:0.3"))
    _, waiting = core.add_request(params())
    wait_until(lambda: core.snapshot()["running"])
    core.stop()
    for future in (running, waiting):
        with pytest.raises(EngineUnavailable, match="shutting down"):
            future.result(TIMEOUT_S)
    assert not core.is_healthy()
    with pytest.raises(EngineUnavailable):
        core.add_request(params())


def test_worker_that_cannot_load_names_the_reason(tmp_path):
    core = make_core(str(tmp_path), factory=BROKEN_FACTORY)
    with pytest.raises(WorkerStartError, match=f"could not load {tmp_path}: FileNotFoundError: no weights in"):
        core.start()
    assert not core.is_healthy()
    with pytest.raises(EngineUnavailable, match="not started"):
        core.add_request(params())
