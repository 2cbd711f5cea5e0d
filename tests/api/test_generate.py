"""POST /generate and GET /health against a live server running the real worker on the tiny checkpoint."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve.engine.request import GenerationParams
from serve.pipeline.mp4 import decode_mp4

STAGES = ("queue", "text_encode", "denoise", "decode", "mp4", "total")


def server_timing(header: str) -> dict[str, float]:
    entries = [part.strip().split(";dur=") for part in header.split(",")]
    return {name: float(ms) for name, ms in entries}


def test_video_has_the_requested_frames_size_and_fps(real_server):
    body = {
        "prompt": "a red square moving left",
        "height": 48,
        "width": 80,
        "num_frames": 13,
        "fps": 12,
        "num_inference_steps": 2,
        "seed": 5,
    }
    with real_server.client() as http:
        response = http.post("/generate", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4"
    frames, fps = decode_mp4(response.content)
    assert frames.shape == (13, 48, 80, 3) and fps == 12
    assert response.headers["x-reelserve-seed"] == "5"
    assert response.headers["x-reelserve-request-id"].startswith("req-")
    assert "x-reelserve-adjusted" not in response.headers
    timings = server_timing(response.headers["server-timing"])
    assert tuple(timings) == STAGES and all(ms >= 0 for ms in timings.values())
    assert timings["total"] >= timings["denoise"] > 0


def test_lossless_video_is_bit_exact_to_the_runners_frames(real_server, tiny_model_dir):
    from serve.worker.model_runner import ModelRunner

    params = GenerationParams(
        prompt="a blue bird over the sea",
        negative_prompt="night",
        height=32,
        width=48,
        num_frames=5,
        fps=8,
        num_inference_steps=3,
        guidance_scale=4.0,
        guidance_scale_2=3.0,
        seed=1234,
        sampler="euler",
        lossless=True,
    )
    with real_server.client() as http:
        fields = {k: v for k, v in params.__dict__.items() if k not in ("preset", "loras", "image")}
        response = http.post("/generate", json=fields)
    assert response.status_code == 200, response.text
    expected = ModelRunner.from_checkpoint(tiny_model_dir).generate(params).frames
    frames, _ = decode_mp4(response.content)
    np.testing.assert_array_equal(frames, expected)


def test_absent_fields_take_the_models_defaults_and_a_random_seed(real_server):
    with real_server.client() as http:
        first = http.post("/generate", json={"prompt": "a cat"})
        second = http.post("/generate", json={"prompt": "a cat"})
    assert first.status_code == 200, first.text
    frames, fps = decode_mp4(first.content)
    assert frames.shape == (9, 64, 64, 3) and fps == 16  # reelserve_defaults.json of the tiny checkpoint
    seeds = {int(first.headers["x-reelserve-seed"]), int(second.headers["x-reelserve-seed"])}
    assert len(seeds) == 2


def test_sizes_the_model_cannot_take_are_rounded_down_and_reported(real_server):
    body = {"prompt": "a dog", "height": 70, "width": 100, "num_frames": 12, "num_inference_steps": 1}
    with real_server.client() as http:
        response = http.post("/generate", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["x-reelserve-adjusted"] == "height=70->64; width=100->96; num_frames=12->9"
    assert decode_mp4(response.content)[0].shape == (9, 64, 96, 3)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("height", 1296, "height must be <= 1280 (server limit --max-height)"),
        ("width", 2000, "width must be <= 1280 (server limit --max-width)"),
        ("height", 8, "height must be >= 16 (server limit --min-height)"),
        ("num_frames", 133, "num_frames must be <= 129 (server limit --max-num-frames)"),
        ("num_inference_steps", 0, "num_inference_steps must be >= 1"),
        ("num_inference_steps", 101, "num_inference_steps must be <= 100 (server limit --max-num-inference-steps)"),
        ("fps", 0, "fps must be >= 1"),
        ("fps", 61, "fps must be <= 60 (server limit --max-fps)"),
        ("guidance_scale", 21.0, "guidance_scale must be <= 20.0"),
        ("prompt", "a" * 2001, "prompt must be at most 2000 characters (server limit --max-prompt-chars)"),
        ("negative_prompt", "b" * 2001, "negative_prompt must be at most 2000 characters"),
        ("prompt", "", "prompt must not be empty"),
        ("prompt", "   ", "prompt must not be empty"),
        ("sampler", "ddim", "'unipc' or 'euler'"),
        ("seed", -1, "greater than or equal to 0"),
        ("height", "64", "valid integer"),
        ("lossless", "yes", "valid boolean"),
        ("steps", 4, "Extra inputs are not permitted"),
    ],
)
def test_invalid_field_gets_422_naming_field_and_bound(real_server, field, value, expected):
    body = {"prompt": "a cat", field: value}
    with real_server.client() as http:
        response = http.post("/generate", json=body)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert [e["loc"] for e in errors] == [["body", field]]
    assert expected in errors[0]["msg"]


def test_missing_prompt_gets_422(real_server):
    with real_server.client() as http:
        response = http.post("/generate", json={"height": 64})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "prompt"]


def test_health_is_ok_while_the_worker_lives(real_server):
    with real_server.client() as http:
        response = http.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_worker_killed_mid_request_retries_it_from_its_seed_and_the_server_recovers(real_server):
    """A request whose worker dies after a step starts over (once) on the new worker and makes the
    video it would have made: its noise comes from its seed."""
    engine = real_server.engine
    old_pid = engine.worker_pid
    slow = {"prompt": "a slow car", "seed": 21, "height": 128, "width": 128, "num_frames": 17}
    slow["num_inference_steps"] = 20
    with real_server.client() as http, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, "/generate", json=slow)
        deadline = time.monotonic() + 30
        while not any(step >= 1 for step in engine.core.snapshot()["running"].values()):
            assert time.monotonic() < deadline, "the request never started denoising"
            time.sleep(0.005)
        os.kill(old_pid, signal.SIGKILL)
        retried = pending.result()
        undisturbed = http.post("/generate", json=slow)
        health = http.get("/health")
    assert retried.status_code == 200, retried.text
    assert undisturbed.status_code == 200
    np.testing.assert_array_equal(decode_mp4(retried.content)[0], decode_mp4(undisturbed.content)[0])
    assert health.status_code == 200
    assert engine.worker_pid != old_pid
