"""Faults and configured limits, against a live server whose worker runs the fake runner
(max_height=48, max_num_frames=17, max_prompt_chars=20, max_queue=1)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from serve.engine.config import WorkersConfig
from serve.engine.request import GenerationParams
from serve.pipeline.mp4 import decode_mp4
from tests.api.conftest import fake_server
from tests.engine.fake_runner import LOAD_DELAY_ENV, fake_frames

SMALL = {"height": 32, "width": 32, "num_frames": 5}


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def test_limits_come_from_the_config(small_limits_server):
    cases = [
        ({"height": 64}, "height", "height must be <= 48 (server limit --max-height)"),
        ({"num_frames": 21}, "num_frames", "num_frames must be <= 17 (server limit --max-num-frames)"),
        ({"prompt": "x" * 21}, "prompt", "prompt must be at most 20 characters"),
    ]
    with small_limits_server.client() as http:
        for override, field, message in cases:
            response = http.post("/generate", json={"prompt": "a cat", **SMALL, **override})
            assert response.status_code == 422, response.text
            assert response.json()["detail"][0]["loc"] == ["body", field]
            assert message in response.json()["detail"][0]["msg"]


def test_a_model_default_over_the_limit_says_so(small_limits_server):
    with small_limits_server.client() as http:
        response = http.post("/generate", json={"prompt": "a cat", "width": 32, "num_frames": 5})
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"] == (
        "height must be <= 48 (server limit --max-height) (the model's default; send a smaller value)"
    )


def test_worker_exception_is_a_500_with_the_reason_and_the_next_request_succeeds(small_limits_server):
    with small_limits_server.client() as http:
        failed = http.post("/generate", json={"prompt": "raise", **SMALL})
        after = http.post("/generate", json={"prompt": "a cat", "seed": 9, "lossless": True, **SMALL})
    assert failed.status_code == 500
    body = failed.json()
    assert body["type"] == "generation_failed"
    assert body["detail"] == "RuntimeError: fake runner was told to fail"
    assert after.status_code == 200
    expected = fake_frames(GenerationParams("a cat", "", 32, 32, 5, 16, 4, 4.0, 3.0, seed=9))
    np.testing.assert_array_equal(decode_mp4(after.content)[0], expected)


def test_full_queue_gets_429_with_retry_after_at_once(small_limits_server):
    engine = small_limits_server.engine
    with small_limits_server.client() as http, ThreadPoolExecutor(2) as pool:
        running = pool.submit(http.post, "/generate", json={"prompt": "sleep:1", **SMALL})
        wait_until(lambda: engine.core.snapshot()["running"])
        waiting = pool.submit(http.post, "/generate", json={"prompt": "a cat", **SMALL})
        wait_until(lambda: engine.core.snapshot()["waiting"])
        start = time.monotonic()
        refused = http.post("/generate", json={"prompt": "a dog", **SMALL})
        elapsed = time.monotonic() - start
        assert running.result().status_code == 200 and waiting.result().status_code == 200
    assert refused.status_code == 429 and elapsed < 0.5
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["type"] == "queue_full"


def test_health_is_503_while_the_worker_restarts(small_limits_server, monkeypatch):
    monkeypatch.setenv(LOAD_DELAY_ENV, "1.5")  # the replacement worker loads slowly
    engine = small_limits_server.engine
    with small_limits_server.client() as http:
        engine.core.executor.workers[0].proc.kill()
        wait_until(lambda: http.get("/health").status_code == 503)
        body = http.get("/health").json()
        assert body["status"] == "unavailable" and "not running" in body["reason"]
        wait_until(lambda: http.get("/health").status_code == 200)
        assert http.post("/generate", json={"prompt": "a cat", **SMALL}).status_code == 200


def test_health_stays_200_while_one_of_two_workers_restarts_and_ready_names_it(tiny_model_dir, monkeypatch):
    with fake_server(tiny_model_dir, workers=WorkersConfig(count=2)) as server, server.client() as http:
        assert http.get("/ready").status_code == 200
        monkeypatch.setenv(LOAD_DELAY_ENV, "600")  # the replacement is still loading when the test ends
        server.engine.core.executor.workers[1].proc.kill()
        wait_until(lambda: "loading the model" in http.get("/ready").json().get("reason", ""))
        ready = http.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["reason"].startswith("worker 1 (cpu) is not running (restarting: loading the model")
        assert "worker 0" not in ready.json()["reason"]
        assert http.get("/health").json() == {"status": "ok"}
        served = http.post("/generate", json={"prompt": "a cat", "seed": 4, "lossless": True, **SMALL})
        assert served.status_code == 200  # by worker 0, while worker 1 reloads
        expected = fake_frames(GenerationParams("a cat", "", 32, 32, 5, 16, 4, 4.0, 3.0, seed=4))
        np.testing.assert_array_equal(decode_mp4(served.content)[0], expected)
        assert http.get("/health").status_code == 200 and http.get("/ready").status_code == 503


def test_oversized_bodies_are_refused_before_parsing(small_limits_server):
    big = '{"prompt": "' + "x" * (2 << 20) + '"}'
    with small_limits_server.client() as http:
        declared = http.post("/generate", content=big, headers={"content-type": "application/json"})

        def chunks():
            for _ in range(3):
                yield big[: 1 << 20].encode()

        streamed = http.post("/v1/videos", content=chunks(), headers={"content-type": "application/json"})
        after = http.get("/health")
    assert declared.status_code == 413 and "request body over" in declared.json()["detail"]
    assert streamed.status_code == 413
    assert after.status_code == 200
