"""The job store alone: completion states, retention by count and by age, paging."""

import time
from concurrent.futures import Future

from serve.api.jobs import JobStore
from serve.engine.core import GenerationFailed, GenerationResult
from serve.engine.request import GenerationParams

PARAMS = GenerationParams("p", "", 32, 32, 5, 8, 2, 4.0, 3.0, 0)


def finished(store: JobStore, job_id: str, payload: bytes = b"mp4") -> None:
    future: Future = Future()
    store.add(job_id, "m", PARAMS, future)
    future.set_result(GenerationResult(job_id, payload, {"denoise": 0.1}))


def test_completed_failed_and_cancelled_jobs(tmp_path):
    store = JobStore(tmp_path, max_videos=10, ttl_s=60)
    finished(store, "a", b"video-a")
    failing, cancelled = Future(), Future()
    store.add("b", "m", PARAMS, failing)
    store.add("c", "m", PARAMS, cancelled)
    failing.set_exception(GenerationFailed("b", "worker process died"))
    cancelled.set_exception(GenerationFailed("c", "cancelled", cancelled=True))
    a, b, c = store.get("a"), store.get("b"), store.get("c")
    assert a.status == "completed" and a.path.read_bytes() == b"video-a" and a.expires_at >= a.completed_at + 59
    assert b.status == "failed" and b.error == {"code": "generation_failed", "message": "worker process died"}
    assert c.status == "cancelled" and c.path is None


def test_only_the_newest_videos_are_kept(tmp_path):
    store = JobStore(tmp_path, max_videos=2, ttl_s=60)
    for job_id in "abc":
        finished(store, job_id)
    assert store.get("a").path is None and sorted(p.name for p in tmp_path.iterdir()) == ["b.mp4", "c.mp4"]


def test_expired_videos_are_deleted(tmp_path):
    store = JobStore(tmp_path, max_videos=10, ttl_s=1)
    finished(store, "old")
    time.sleep(2.1)  # expires_at has a one-second resolution
    finished(store, "new")
    assert store.get("old").path is None and store.get("new").path.is_file()


def test_list_pages_with_a_cursor(tmp_path):
    store = JobStore(tmp_path, max_videos=10, ttl_s=60)
    for job_id in "abcde":
        finished(store, job_id)
    page, more = store.list(after=None, limit=2, descending=False)
    assert [j.id for j in page] == ["a", "b"] and more
    page, more = store.list(after="b", limit=10, descending=False)
    assert [j.id for j in page] == ["c", "d", "e"] and not more
    page, _ = store.list(after=None, limit=1, descending=True)
    assert [j.id for j in page] == ["e"]
    assert store.delete("c") and not store.delete("c") and not (tmp_path / "c.mp4").exists()
