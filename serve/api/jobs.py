"""Video jobs (the OpenAI Videos API's `video` objects) and the directory their MP4s live in.

State lives in this process's memory and the output directory; several replicas behind a load
balancer need sticky routing by job id or a shared store (see deploy/), not this class.
"""

from __future__ import annotations

import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from serve.engine.core import GenerationFailed, GenerationResult
from serve.engine.request import GenerationParams, RequestStatus

# RequestStatus -> the API's job status.
JOB_STATUS = {
    RequestStatus.WAITING: "queued",
    RequestStatus.ENCODING: "in_progress",
    RequestStatus.DENOISING: "in_progress",
    RequestStatus.DECODING: "in_progress",
    RequestStatus.FINISHED: "completed",
    RequestStatus.FAILED: "failed",
    RequestStatus.CANCELLED: "cancelled",
}


@dataclass
class Job:
    id: str
    model: str
    params: GenerationParams
    created_at: int
    status: str = "queued"
    progress: int = 0
    completed_at: int | None = None
    expires_at: int | None = None
    error: dict | None = None
    path: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")


class JobStore:
    def __init__(self, output_dir: Path | None, max_videos: int, ttl_s: float) -> None:
        self.output_dir = output_dir or Path(tempfile.mkdtemp(prefix="reelserve-videos-"))
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.max_videos = max_videos
        self.ttl_s = ttl_s
        self._jobs: dict[str, Job] = {}  # insertion order = creation order
        self._lock = threading.Lock()  # completions arrive on the engine thread

    def add(self, job_id: str, model: str, params: GenerationParams, future: Future[GenerationResult]) -> Job:
        job = Job(job_id, model, params, created_at=int(time.time()))
        with self._lock:
            self._jobs[job_id] = job
        future.add_done_callback(lambda f: self._complete(job, f))
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def list(self, after: str | None, limit: int, descending: bool) -> tuple[list[Job], bool]:
        """One page of jobs after the cursor `after`, and whether more follow."""
        with self._lock:
            jobs = list(self._jobs.values())
        if descending:
            jobs.reverse()
        if after is not None:
            ids = [j.id for j in jobs]
            jobs = jobs[ids.index(after) + 1 :] if after in ids else []
        return jobs[:limit], len(jobs) > limit

    def delete(self, job_id: str) -> bool:
        with self._lock:
            job = self._jobs.pop(job_id, None)
        if job is None:
            return False
        _unlink(job.path)
        return True

    def _complete(self, job: Job, future: Future[GenerationResult]) -> None:
        now = int(time.time())
        job.completed_at = now
        if future.cancelled():
            job.status = "cancelled"
            return
        error = future.exception()
        if isinstance(error, GenerationFailed) and error.cancelled:
            job.status = "cancelled"
        elif error is not None:
            job.status, job.error = "failed", {"code": "generation_failed", "message": str(error)}
        else:
            result = future.result()
            job.path = self.output_dir / f"{job.id}.mp4"
            job.path.write_bytes(result.mp4)
            job.status, job.progress, job.timings = "completed", 100, result.timings
            job.expires_at = now + int(self.ttl_s)
        self._prune(now)

    def _prune(self, now: int) -> None:
        """Delete expired videos, then the oldest beyond the retention count."""
        with self._lock:
            stored = [j for j in self._jobs.values() if j.path is not None]
            expired = [j for j in stored if j.expires_at is not None and j.expires_at <= now]
            excess = [j for j in stored if j not in expired][: max(0, len(stored) - len(expired) - self.max_videos)]
        for job in expired + excess:
            _unlink(job.path)
            job.path = None


def _unlink(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)
