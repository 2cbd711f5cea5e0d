"""The OpenAI-Videos-shaped job API, driven by the official `openai` client, plus /ready and /metrics."""

import re
import time

import httpx
import openai
import pytest

from serve.pipeline.mp4 import decode_mp4
from tests.api.conftest import fake_server

TIMEOUT_S = 120


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def wait_for(client: openai.OpenAI, video_id: str, statuses=("completed", "failed", "cancelled")):
    deadline = time.monotonic() + TIMEOUT_S
    while (video := client.videos.retrieve(video_id)).status not in statuses:
        assert time.monotonic() < deadline, f"job stuck in {video.status}"
        time.sleep(0.1)
    return video


def metric(server, name: str, label: str = "") -> float:
    """The value of the series `name` (the one with `label`, e.g. `finished_reason="cancelled"`)."""
    text = httpx.get(f"{server.url}/metrics").text
    for match in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
        if not label or label in match[1].split(","):
            return float(match[2])
    return 0.0


def test_openai_client_creates_polls_and_downloads_a_video(real_server):
    client = client_for(real_server)
    job = client.videos.create(
        prompt="a red square moving left",
        seconds="1",
        size="64x48",
        extra_body={"seed": 3, "num_inference_steps": 2, "fps": 8, "lossless": True},
    )
    assert job.object == "video" and job.status in ("queued", "in_progress") and job.size == "64x48"
    done = wait_for(client, job.id)
    assert done.status == "completed" and done.progress == 100 and done.completed_at >= done.created_at
    assert done.expires_at > done.completed_at
    frames, fps = decode_mp4(client.videos.download_content(job.id).read())
    assert frames.shape == (9, 48, 64, 3) and fps == 8  # 1 s at 8 fps -> 8 + 1 frames (4k+1)
    assert job.id in [v.id for v in client.videos.list(limit=100).data]


@pytest.fixture(scope="module")
def slow_server(tiny_model_dir):
    """The production app with the fake runner: prompt "sleep:<s>" makes a request take <s> seconds,
    so cancellation is tested without racing a fast CPU."""
    with fake_server(tiny_model_dir) as server:
        yield server


def wait_for_metric(server, name: str, labels: str, at_least: float) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while metric(server, name, labels) < at_least:
        assert time.monotonic() < deadline, f"{name}{labels} never reached {at_least}"
        time.sleep(0.05)


def test_delete_cancels_a_running_job_and_removes_it(slow_server):
    client = client_for(slow_server)
    before = metric(slow_server, "reelserve:request_success_total", 'finished_reason="cancelled"')
    job = client.videos.create(prompt="sleep:60", size="32x32", extra_body={"num_inference_steps": 60})
    deadline = time.monotonic() + TIMEOUT_S
    while client.videos.retrieve(job.id).progress == 0:  # wait until it is really denoising
        assert time.monotonic() < deadline
        time.sleep(0.05)
    deleted = client.videos.delete(job.id)
    assert deleted.deleted and deleted.id == job.id
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(job.id)
    wait_for_metric(slow_server, "reelserve:request_success_total", 'finished_reason="cancelled"', before + 1)
    assert metric(slow_server, "reelserve:num_requests_running") == 0  # its worker let go of it


def test_content_of_an_unfinished_job_is_not_ready_and_unknown_ids_are_404(real_server):
    with httpx.Client(base_url=real_server.url, timeout=30) as http:
        job = http.post("/v1/videos", json={"prompt": "slow", "num_inference_steps": 60}).json()
        early = http.get(f"/v1/videos/{job['id']}/content")
        if early.status_code != 200:  # 200 only if the machine finished 60 steps already
            assert early.status_code == 404 and early.json()["error"]["code"] == "video_not_ready"
        missing = http.get("/v1/videos/nope")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "video_id"
        http.delete(f"/v1/videos/{job['id']}")


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"seconds": "1000"}, "seconds", "at most 128 (server limit)"),
        ({"size": "4096x64"}, "size", "width 16..1280"),
        ({"num_frames": 1000}, "num_frames", "<= 129"),
    ],
)
def test_bad_job_fields_are_422_naming_the_field(real_server, body, field, words):
    with httpx.Client(base_url=real_server.url, timeout=30) as http:
        response = http.post("/v1/videos", json={"prompt": "a cat", **body})
    assert response.status_code == 422
    error = response.json()["error"]  # OpenAI's error object, as on every /v1 error
    assert error["type"] == "invalid_request_error" and error["param"] == field and words in error["message"]


def test_ready_and_metrics(real_server, tiny_model_dir):
    with httpx.Client(base_url=real_server.url, timeout=30) as http:
        assert http.get("/ready").json() == {"status": "ok"}
        http.post("/generate", json={"prompt": "count me", "num_inference_steps": 2})
        text = http.get("/metrics").text
    # vLLM's names with reelserve's prefix, each with vLLM's model_name label (the served name).
    model = f'model_name="{tiny_model_dir.name}"'
    for name in (
        "reelserve:num_requests_waiting",
        "reelserve:num_requests_running",
        "reelserve:e2e_request_latency_seconds_bucket",
        "reelserve:request_queue_time_seconds_bucket",
        "reelserve:request_inference_time_seconds_bucket",
        "reelserve:denoising_step_time_seconds_bucket",
        "reelserve:denoising_batch_size_bucket",
        "reelserve:expert_swaps_total",
        "reelserve:request_stage_time_seconds_bucket",
    ):
        assert re.search(rf"^{re.escape(name)}\{{[^}}]*{re.escape(model)}", text, re.MULTILINE), name
    assert metric(real_server, "reelserve:request_success_total", 'finished_reason="finished"') >= 1
    # The one request: 2 steps, each observed once in the per-step histogram (warmup is not a request).
    assert metric(real_server, "reelserve:e2e_request_latency_seconds_count") >= 1
    assert metric(real_server, "reelserve:denoising_step_time_seconds_count") >= 2


def test_generate_client_that_disconnects_cancels_its_request(slow_server):
    before = metric(slow_server, "reelserve:request_success_total", 'finished_reason="cancelled"')
    body = {"prompt": "sleep:60", "height": 32, "width": 32, "num_inference_steps": 60}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow_server.url}/generate", json=body, timeout=1.0)
    wait_for_metric(slow_server, "reelserve:request_success_total", 'finished_reason="cancelled"', before + 1)
