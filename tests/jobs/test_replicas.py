"""Two reelserve processes sharing one real redis-server (job records, the work queue, claims,
cancel flags) and one real S3 server (videos), with no sticky routing: any replica answers for any
job, a replica that is killed mid-job is taken over, and 20 jobs spread over both run once each.

Each replica runs the fake runner (prompt "sleep:<s>": a video takes about <s> seconds), so what
is exercised is the sharing, not the model."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serve.jobs.redis_store import RedisJobStore
from serve.pipeline.mp4 import decode_mp4
from tests.engine.fake_runner import fake_frames
from tests.jobs.server_process import ServerProcess
from tests.requests import make_params

TIMEOUT_S = 300  # guards against hangs only
SIZE = {"width": 32, "height": 32, "num_frames": 5, "num_inference_steps": 4, "lossless": True}
# A killed replica's job is taken over after this long without a heartbeat: long enough that a
# replica stalled by a loaded machine is not mistaken for a dead one.
CLAIM_IDLE_S = "5"


@pytest.fixture
def shared(redis_url, s3_service, tiny_model_dir, tmp_path):
    """A factory of replicas on the shared stores (each with its own output directory and log)."""
    flags = ["--job-store", redis_url, "--artifacts", s3_service.url(), "--s3-endpoint-url", s3_service.endpoint_url]
    flags += ["--claim-idle-s", CLAIM_IDLE_S]
    started: list[ServerProcess] = []

    def replica(name: str, *extra: str) -> ServerProcess:
        proc = ServerProcess(tiny_model_dir, *flags, "--output-dir", str(tmp_path / name), *extra)
        proc.log = tmp_path / f"{name}.log"
        started.append(proc)
        return proc.start()

    yield replica
    for proc in started:
        proc.stop()


def create(server: ServerProcess, seconds: float, seed: int) -> str:
    response = httpx.post(f"{server.url}/v1/videos", json={"prompt": f"sleep:{seconds}", "seed": seed, **SIZE})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def retrieve(server: ServerProcess, job_id: str) -> httpx.Response:
    return httpx.get(f"{server.url}/v1/videos/{job_id}", timeout=60)


def wait_until(server: ServerProcess, job_id: str, statuses=("completed", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + TIMEOUT_S
    while (video := retrieve(server, job_id).json())["status"] not in statuses:
        assert time.monotonic() < deadline, f"job {job_id} stuck in {video['status']}"
        time.sleep(0.1)
    return video


def assert_video(server: ServerProcess, job_id: str, seconds: float, seed: int) -> None:
    response = httpx.get(f"{server.url}/v1/videos/{job_id}/content", timeout=60)
    assert response.status_code == 200, response.text
    expected = fake_frames(make_params(prompt=f"sleep:{seconds}", seed=seed, **SIZE))
    np.testing.assert_array_equal(decode_mp4(response.content)[0], expected)


def finished_here(server: ServerProcess, status: str = "finished") -> int:
    """How many requests this replica's engine ran to the given end (its Prometheus counter)."""
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(
        rf'^reelserve:request_success_total{{finished_reason="{status}",[^}}]*}} (\S+)$', text, re.MULTILINE
    )
    return int(float(match[1])) if match else 0


def running_here(server: ServerProcess) -> int:
    """Requests this replica's workers hold now (its Prometheus gauge)."""
    text = httpx.get(f"{server.url}/metrics").text
    return int(float(re.search(r"^reelserve:num_requests_running\{[^}]*\} (\S+)$", text, re.MULTILINE)[1]))


def test_any_replica_answers_for_any_job(shared):
    """Created on A; retrieved, listed, downloaded and deleted (cancelling it) on B. B hands out
    presigned S3 URLs instead of streaming the video itself (--presigned-urls)."""
    a, b = shared("a"), shared("b", "--presigned-urls")
    done = create(a, 0.2, seed=1)
    assert wait_until(b, done)["status"] == "completed"
    assert_video(a, done, 0.2, seed=1)
    redirect = httpx.get(f"{b.url}/v1/videos/{done}/content")
    assert redirect.status_code == 307 and "X-Amz-Signature=" in redirect.headers["location"]
    frames = decode_mp4(httpx.get(redirect.headers["location"]).content)[0]
    np.testing.assert_array_equal(frames, fake_frames(make_params(prompt="sleep:0.2", seed=1, **SIZE)))
    running = create(a, 60, seed=2)
    wait_until(b, running, statuses=("in_progress",))
    listed_on_b = httpx.get(f"{b.url}/v1/videos", params={"limit": 100}).json()["data"]
    assert {v["id"] for v in listed_on_b} == {done, running}
    assert httpx.delete(f"{b.url}/v1/videos/{running}").json()["deleted"] is True
    assert retrieve(a, running).status_code == 404 and retrieve(b, running).status_code == 404
    # The replica that ran it stops it at its next heartbeat (a tick, ~0.1 s), not after 60 s.
    deadline = time.monotonic() + TIMEOUT_S
    while finished_here(a, "cancelled") + finished_here(b, "cancelled") == 0:
        assert time.monotonic() < deadline, "the running replica never cancelled the deleted job"
        time.sleep(0.1)


def test_a_killed_replicas_job_is_taken_over_and_finished(shared, redis_url):
    """SIGKILL of the replica running a job: once its claim has been idle for --claim-idle-s the
    other replica takes the job over and finishes it, with the same seed, so the same video."""
    a, b = shared("a"), shared("b")
    job_id = create(a, 20, seed=3)
    wait_until(a, job_id, statuses=("in_progress",))
    owner, other = (a, b) if running_here(a) else (b, a)
    assert running_here(owner) == 1 and running_here(other) == 0
    owner.kill()
    assert wait_until(other, job_id)["status"] == "completed"
    assert_video(other, job_id, 20, seed=3)
    store = RedisJobStore(redis_url)
    try:
        assert store.get(job_id).attempts == 2  # claimed by A, then taken over by B
    finally:
        store.close()


def test_twenty_jobs_over_two_replicas_each_run_once(shared, redis_url):
    a, b = shared("a"), shared("b")
    jobs = {create(a if i % 2 else b, 0.3, seed=i): i for i in range(20)}
    for job_id, seed in jobs.items():
        assert wait_until(a if seed % 3 else b, job_id)["status"] == "completed"
    for job_id, seed in list(jobs.items())[:4]:
        assert_video(b if seed % 2 else a, job_id, 0.3, seed=seed)
    ran = finished_here(a), finished_here(b)
    assert sum(ran) == 20 and min(ran) > 0, f"runs per replica: {ran}"  # each once, on both replicas
    store = RedisJobStore(redis_url)
    try:
        assert [store.get(j).attempts for j in jobs] == [1] * 20  # and never claimed twice
    finally:
        store.close()


def test_a_missing_bucket_is_refused_at_start_naming_it(s3_service, tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from tests.jobs.server_process import ROOT

    bucket = f"s3://no-such-bucket-{int(time.time())}/videos"
    argv = [sys.executable, "-m", "tests.jobs.server_process", "serve", "--model", str(tiny_model_dir), "--port", "0"]
    argv += ["--artifacts", bucket, "--s3-endpoint-url", s3_service.endpoint_url, "--output-dir", str(tmp_path)]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 2 and bucket.split("/")[2] in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_shared_job_store_without_shared_files_is_refused(tiny_model_dir, tmp_path):
    """Redis for jobs but a per-host directory for videos would lose files between replicas."""
    import subprocess
    import sys

    from tests.jobs.server_process import ROOT

    argv = [sys.executable, "-m", "tests.jobs.server_process", "serve", "--model", str(tiny_model_dir)]
    argv += ["--job-store", "redis://127.0.0.1:6379/0", "--output-dir", str(tmp_path)]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 2 and "--artifacts s3://" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_redis_is_refused_at_start_naming_it(s3_service, tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from tests.jobs.server_process import ROOT, free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    argv = [sys.executable, "-m", "tests.jobs.server_process", "serve", "--model", str(tiny_model_dir), "--port", "0"]
    argv += ["--job-store", url, "--output-dir", str(Path(tmp_path)), "--artifacts", s3_service.url()]
    argv += ["--s3-endpoint-url", s3_service.endpoint_url]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 2 and "127.0.0.1" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
