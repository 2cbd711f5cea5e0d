"""The job service in one process (the fake runner in the worker): retention deletes a job's
record and its video together, the store's queue bound answers 429, and where the files live."""

from __future__ import annotations

import time

import httpx
import pytest

from serve.api import jobs as service
from serve.engine.config import SchedulerConfig
from tests.api.conftest import fake_server

TIMEOUT_S = 120  # guards against hangs only
SIZE = {"width": 32, "height": 32, "num_frames": 5, "num_inference_steps": 2}


def create(http: httpx.Client, prompt: str = "a cat", seed: int = 1) -> str:
    response = http.post("/v1/videos", json={"prompt": prompt, "seed": seed, **SIZE})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def wait_until(http: httpx.Client, job_id: str, statuses=("completed", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + TIMEOUT_S
    while (video := http.get(f"/v1/videos/{job_id}").json())["status"] not in statuses:
        assert time.monotonic() < deadline, f"job {job_id} stuck in {video['status']}"
        time.sleep(0.05)
    return video


@pytest.mark.parametrize("limit", ["count", "ttl"])
def test_retention_deletes_the_record_and_the_video_together(limit, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(service, "PRUNE_EVERY_S", 3600.0)  # only the test's prune(now=True) prunes
    config = {"max_stored_videos": 1} if limit == "count" else {"video_ttl_s": 1.0}
    with fake_server(tiny_model_dir, output_dir=tmp_path, **config) as server, server.client() as http:
        old = create(http, seed=1)
        wait_until(http, old)
        new = create(http, seed=2)
        video = wait_until(http, new)
        assert (tmp_path / "videos" / f"{old}.mp4").is_file() and (tmp_path / "videos" / f"{new}.mp4").is_file()
        if limit == "ttl":
            while time.time() <= video["expires_at"] + 1:  # expires_at has a one-second resolution
                time.sleep(0.1)
        server.app.state.jobs.runner.prune(now=True)
        gone = [old] if limit == "count" else [old, new]
        for job_id in gone:
            assert http.get(f"/v1/videos/{job_id}").status_code == 404
            assert not (tmp_path / "videos" / f"{job_id}.mp4").exists()
        listed = [v["id"] for v in http.get("/v1/videos").json()["data"]]
        assert listed == ([new] if limit == "count" else [])


def test_a_full_job_queue_answers_429_and_loses_nothing(tiny_model_dir, tmp_path):
    """One job runs, one waits in the store; with room for one waiting request the next is a 429
    in OpenAI's error shape, and both accepted jobs still complete."""
    with (
        fake_server(
            tiny_model_dir,
            output_dir=tmp_path,
            scheduler=SchedulerConfig(max_queue=1, max_running_per_worker=1),
        ) as server,
        server.client() as http,
    ):
        running = create(http, "sleep:2", seed=1)
        wait_until(http, running, statuses=("in_progress",))
        waiting = create(http, seed=2)
        refused = http.post("/v1/videos", json={"prompt": "a dog", **SIZE})
        assert refused.status_code == 429 and "retry-after" in refused.headers
        assert refused.json()["error"]["code"] == "queue_full"
        assert wait_until(http, running)["status"] == "completed"
        assert wait_until(http, waiting)["status"] == "completed"


def test_generate_leaves_no_file_behind(tiny_model_dir, tmp_path):
    """`POST /generate` answers with the MP4 the worker wrote to scratch (the video's bytes, with
    its length), and deletes the file once sent."""
    with fake_server(tiny_model_dir, output_dir=tmp_path) as server, server.client() as http:
        response = http.post("/generate", json={"prompt": "a cat", "seed": 3, **SIZE})
        assert response.status_code == 200 and response.content[4:8] == b"ftyp"
        assert int(response.headers["content-length"]) == len(response.content)
        deadline = time.monotonic() + TIMEOUT_S
        while any((tmp_path / "scratch").rglob("*.mp4")):  # deleted by a background task after sending
            assert time.monotonic() < deadline
            time.sleep(0.05)
