"""The embedded job store (SQLite + the output directory) across process deaths, with reelserve as
its own process: SIGTERM drains and exits 0, SIGKILL loses nothing that was accepted, a restart
runs what was queued or running again (same seed, same video) and keeps completed jobs downloadable.
And an output directory that cannot be written: refused at start, and mid-run a job fails with
the reason, `/ready` says why, and no partial file is left.

The worker runs the fake runner (tests/engine/fake_runner.py): prompt "sleep:<s>" makes a video
take about <s> seconds, so jobs are still queued or running when the signal arrives."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serve.pipeline.mp4 import decode_mp4
from tests.engine.fake_runner import fake_frames
from tests.jobs.server_process import ROOT, ServerProcess
from tests.requests import make_params

TIMEOUT_S = 300  # guards against hangs only
SIZE = {"width": 32, "height": 32, "num_frames": 5, "num_inference_steps": 4, "lossless": True}


def job(client, seconds: float, seed: int) -> str:
    response = client.post("/v1/videos", json={"prompt": f"sleep:{seconds}", "seed": seed, **SIZE})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def wait_until(client, job_id: str, statuses=("completed", "failed", "cancelled")) -> dict:
    deadline = time.monotonic() + TIMEOUT_S
    while (video := client.get(f"/v1/videos/{job_id}").json())["status"] not in statuses:
        assert time.monotonic() < deadline, f"job {job_id} stuck in {video['status']}"
        time.sleep(0.1)
    return video


def expected_frames(seconds: float, seed: int) -> np.ndarray:
    return fake_frames(make_params(prompt=f"sleep:{seconds}", seed=seed, **SIZE))


def assert_video(client, job_id: str, seconds: float, seed: int) -> None:
    response = client.get(f"/v1/videos/{job_id}/content")
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(decode_mp4(response.content)[0], expected_frames(seconds, seed))


def leftovers(output_dir: Path) -> list[Path]:
    """Files that are neither finished videos nor the store's own (a partial write left behind)."""
    partial = output_dir / ".partial"
    return sorted(p for p in partial.rglob("*") if p.is_file()) if partial.exists() else []


@pytest.fixture
def output_dir(tmp_path) -> Path:
    return tmp_path / "out"


def server(tiny_model_dir, output_dir: Path, tmp_path: Path, *flags: str) -> ServerProcess:
    flags = ("--output-dir", str(output_dir), "--max-running-per-worker", "1", *flags)
    return ServerProcess(tiny_model_dir, *flags, log=tmp_path / "server.log")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_every_job_survives_a_restart(sig, tiny_model_dir, output_dir, tmp_path):
    """Jobs completed, running and queued when the process goes; after the restart every one of
    them completes with the video its seed gives, and the completed one still downloads."""
    first = server(tiny_model_dir, output_dir, tmp_path, "--shutdown-timeout-s", "0.5").start()
    try:
        with first.client() as client:
            done = job(client, 0.1, seed=1)
            wait_until(client, done)
            running = job(client, 4, seed=2)  # still running when the signal comes
            queued = [job(client, 0.2, seed=s) for s in (3, 4)]  # one runs at a time: these wait
            wait_until(client, running, statuses=("in_progress",))
        if sig == signal.SIGKILL:
            first.kill()
        else:
            first.signal(sig)
            assert first.wait() == 0  # drained for 0.5 s, then the rest stays queued: a clean exit
    finally:
        first.stop()
    with server(tiny_model_dir, output_dir, tmp_path) as second, second.client() as client:
        listed = {v["id"] for v in client.get("/v1/videos", params={"limit": 100}).json()["data"]}
        assert listed == {done, running, *queued}
        assert_video(client, done, 0.1, seed=1)  # completed before: kept, not run again
        for job_id, seconds, seed in [(running, 4, 2), (queued[0], 0.2, 3), (queued[1], 0.2, 4)]:
            assert wait_until(client, job_id)["status"] == "completed"
            assert_video(client, job_id, seconds, seed)
    assert leftovers(output_dir) == []


def test_sigterm_drains_running_work_and_refuses_new_work_meanwhile(tiny_model_dir, output_dir, tmp_path):
    """While draining: /ready is 503, a new job gets 503 with Retry-After, the running job ends
    completed, and the process exits 0 without waiting out the timeout."""
    proc = server(tiny_model_dir, output_dir, tmp_path, "--shutdown-timeout-s", "600").start()
    try:
        with proc.client() as client:
            running = job(client, 8, seed=5)  # runs well past the checks below
            wait_until(client, running, statuses=("in_progress",))
            proc.signal(signal.SIGTERM)
            deadline = time.monotonic() + TIMEOUT_S
            ready = client.get("/ready")
            while ready.status_code == 200:  # the signal handler runs between two requests
                assert time.monotonic() < deadline, "/ready never turned 503 after SIGTERM"
                ready = client.get("/ready")
            assert ready.status_code == 503 and "shutting down" in ready.json()["reason"]
            refused = client.post("/v1/videos", json={"prompt": "late", **SIZE})
            assert refused.status_code == 503 and "retry-after" in refused.headers
            assert refused.json()["error"]["type"] == "unavailable"
        assert proc.wait() == 0
    finally:
        proc.stop()
    with server(tiny_model_dir, output_dir, tmp_path) as again, again.client() as client:
        assert client.get(f"/v1/videos/{running}").json()["status"] == "completed"
        assert_video(client, running, 8, seed=5)


def test_a_queued_job_whose_image_is_gone_fails_with_the_reason(tiny_model_dir, output_dir, tmp_path):
    """Inputs live beside the job: a restart that finds the uploaded image deleted fails the job
    and says why, instead of running it without its image."""
    from serve.api.jobs import SQLITE_FILE
    from serve.jobs.records import JobRecord, image_key
    from serve.jobs.sqlite import SqliteJobStore

    store = SqliteJobStore(output_dir / SQLITE_FILE)
    params = make_params(prompt="sleep:0.1", seed=9, **SIZE)
    store.create(JobRecord("video_lost_image", "wan22-tiny", params, time.time(), image_size=(32, 32)))
    store.close()
    assert not (output_dir / image_key("video_lost_image")).exists()  # where the artifact store keeps it
    with server(tiny_model_dir, output_dir, tmp_path) as proc, proc.client() as client:
        video = wait_until(client, "video_lost_image")
    assert video["status"] == "failed" and "input image" in video["error"]["message"]


# ---- an output directory that cannot be written ---------------------------------------------------


@contextlib.contextmanager
def mounted(target: Path, *options: str):
    """A tmpfs or a read-only bind mount at `target` for the block (the tests run as root, as CI does)."""
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", *options, str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def can_mount() -> bool:
    return sys.platform == "linux" and Path("/proc/self/uid_map").exists() and _is_root()


def _is_root() -> bool:
    import os

    return os.geteuid() == 0


needs_mount = pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs needs root (CI runs as root)")


@needs_mount
def test_a_read_only_output_dir_is_refused_at_start_naming_it(tiny_model_dir, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    target = tmp_path / "readonly"
    with mounted(target, "--bind", str(source)):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        result = subprocess.run(
            [sys.executable, "-m", "tests.jobs.server_process", "serve", "--model", str(tiny_model_dir)]
            + ["--output-dir", str(target), "--port", "0"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    assert result.returncode == 2
    assert str(target) in result.stderr and "Read-only file system" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@needs_mount
def test_a_full_output_dir_fails_that_job_with_the_reason_and_leaves_nothing(tiny_model_dir, tmp_path):
    """The whole output directory (job store and videos) on a 200 KiB tmpfs: a video that does
    not fit fails its job with the disk's reason (no host path in it), no partial file stays,
    and the server goes on: the next job that fits completes."""
    out = tmp_path / "tmpfs"
    with mounted(out, "-t", "tmpfs", "-o", "size=200k", "tmpfs"):
        flags = ("--max-height", "256", "--max-width", "256")
        with server(tiny_model_dir, out, tmp_path, *flags) as proc, proc.client() as client:
            big = {"prompt": "noise", "seed": 1, "width": 128, "height": 128, "num_frames": 17}
            response = client.post("/v1/videos", json={**big, "num_inference_steps": 1, "lossless": True})
            video = wait_until(client, response.json()["id"])
            assert video["status"] == "failed" and video["error"]["code"] == "storage_failed"
            assert "No space left on device" in video["error"]["message"]
            assert str(tmp_path) not in video["error"]["message"]
            assert leftovers(out) == []
            small = job(client, 0.1, seed=2)
            assert wait_until(client, small)["status"] == "completed"
            assert_video(client, small, 0.1, seed=2)
            assert client.get("/ready").status_code == 200
        assert sorted(p.name for p in (out / "videos").rglob("*") if p.is_file()) == [f"{small}.mp4"]


@needs_mount
def test_an_artifact_store_turned_read_only_fails_jobs_and_the_server_is_not_ready(tiny_model_dir, tmp_path):
    """Videos on a mount that turns read-only mid-run: the job fails with the reason, /ready is 503
    naming the cause while it stays so (no new job is claimed meanwhile), and once it is writable
    again /ready is 200 and jobs complete."""
    source, videos = tmp_path / "source", tmp_path / "videos"
    source.mkdir()
    with mounted(videos, "--bind", str(source)):
        flags = ("--artifacts", str(videos))
        with server(tiny_model_dir, tmp_path / "out", tmp_path, *flags) as proc, proc.client() as client:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(videos)], check=True)
            failed = job(client, 0.1, seed=3)
            video = wait_until(client, failed)
            assert video["status"] == "failed" and video["error"]["code"] == "storage_failed"
            assert "Read-only file system" in video["error"]["message"]
            ready = client.get("/ready")
            assert ready.status_code == 503 and "not writable" in ready.json()["reason"]
            subprocess.run(["mount", "-o", "remount,bind,rw", str(videos)], check=True)
            deadline = time.monotonic() + TIMEOUT_S
            while client.get("/ready").status_code != 200:  # probed again every few seconds
                assert time.monotonic() < deadline, "still not ready after the store became writable"
                time.sleep(0.2)
            small = job(client, 0.1, seed=4)
            assert wait_until(client, small)["status"] == "completed"
            assert_video(client, small, 0.1, seed=4)
        assert sorted(p.name for p in source.rglob("*") if p.is_file()) == [f"{small}.mp4"]


def test_a_drain_that_runs_out_of_time_ends_open_requests_and_exits_0(tiny_model_dir, output_dir, tmp_path):
    """A `POST /generate` still running at the drain deadline gets a 503 instead of holding the
    process open; the process exits 0."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    proc = server(tiny_model_dir, output_dir, tmp_path, "--shutdown-timeout-s", "1").start()
    try:
        with ThreadPoolExecutor(1) as pool, proc.client() as client:
            body = {"prompt": "sleep:120", "seed": 6, **SIZE}
            pending = pool.submit(httpx.post, f"{proc.url}/generate", json=body, timeout=TIMEOUT_S)
            deadline = time.monotonic() + TIMEOUT_S
            while not re.search(r"^reelserve:num_requests_running\{.*\} 1", client.get("/metrics").text, re.MULTILINE):
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.1)
            proc.signal(signal.SIGTERM)
            assert proc.wait() == 0
            response = pending.result()
        assert response.status_code == 503 and "shutting down" in response.json()["detail"]
    finally:
        proc.stop()
