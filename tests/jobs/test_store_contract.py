"""The JobStore contract (serve/jobs/store.py), one test body run against every store: the
embedded SQLite store and the shared Redis store on a real redis-server.

Claims expire by time; the tests only ever wait longer than an idle time (a lower bound) and
never assert that something happened within a time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from serve.jobs.records import CANCELLED, COMPLETED, FAILED, IN_PROGRESS, QUEUED, JobRecord, video_key
from serve.jobs.redis_store import RedisJobStore
from serve.jobs.sqlite import SqliteJobStore
from serve.jobs.store import JobStore, StoreUnavailable
from tests.requests import make_params
from tests.services import RedisService, free_port

IDLE_S = 1.0  # small claim idle time for the takeover tests
PAST_IDLE_S = IDLE_S * 1.3  # how long a claim is left unrefreshed to be taken over


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        opened: JobStore = SqliteJobStore(tmp_path / "jobs.sqlite3")
    else:
        service: RedisService = request.getfixturevalue("redis_service")
        opened = RedisJobStore(service.url(), prefix=service.prefix())
    yield opened
    opened.close()


def record(job_id: str, created_at: float | None = None) -> JobRecord:
    params = make_params(seed=7, loras=(("style", 0.5),))  # a LoRA too: tuples must survive the JSON
    return JobRecord(job_id, "demo", params, created_at=time.time() if created_at is None else created_at)


def create(store: JobStore, count: int) -> list[str]:
    """`count` queued jobs, created in order; their ids."""
    ids = [f"video_{i:03d}" for i in range(count)]
    base = time.time()
    for i, job_id in enumerate(ids):
        store.create(record(job_id, base + i))
    return ids


def ended(store: JobStore, job_id: str, status: str, *, artifact: bool = False, expires_at: float | None = None):
    """The record a replica would finish `job_id` with."""
    final = store.get(job_id)
    final.status, final.completed_at, final.expires_at = status, time.time(), expires_at
    if status == COMPLETED:
        final.progress = 100
    if artifact:
        final.artifact = video_key(job_id)
    if status == FAILED:
        final.error = {"code": "generation_failed", "message": "boom"}
    return final


def test_implements_the_protocol(store: JobStore) -> None:
    assert isinstance(store, JobStore)
    store.check()


def test_create_and_get_round_trip(store: JobStore) -> None:
    original = record("video_a")
    original.image_size = (64, 48)
    store.create(original)
    assert store.get("video_a") == original
    assert store.get("video_a").status == QUEUED
    assert store.get("video_nope") is None


def test_list_pages_in_creation_order(store: JobStore) -> None:
    ids = create(store, 5)
    page, more = store.list(None, 10, "asc")
    assert [r.id for r in page] == ids and not more
    page, more = store.list(None, 2, "asc")
    assert [r.id for r in page] == ids[:2] and more
    page, more = store.list(ids[1], 2, "asc")
    assert [r.id for r in page] == ids[2:4] and more
    page, more = store.list(ids[3], 2, "asc")
    assert [r.id for r in page] == ids[4:] and not more
    page, more = store.list(None, 5, "desc")
    assert [r.id for r in page] == ids[::-1] and not more
    page, more = store.list(ids[3], 2, "desc")
    assert [r.id for r in page] == [ids[2], ids[1]] and more
    page, more = store.list(ids[0], 2, "desc")
    assert page == [] and not more
    assert store.list("video_nope", 10, "asc") == ([], False)


def test_count_queued(store: JobStore) -> None:
    ids = create(store, 3)
    assert store.count_queued() == 3
    store.claim("a", 1, 60)
    assert store.count_queued() == 2
    store.request_cancel(ids[2])
    assert store.count_queued() == 1


def test_queue_position_counts_the_queued_jobs_created_before(store: JobStore) -> None:
    ids = create(store, 4)
    assert [store.queue_position(i) for i in ids] == [0, 1, 2, 3]
    store.claim("a", 1, 60)  # takes the oldest
    store.request_cancel(ids[2])
    assert [store.queue_position(i) for i in ids] == [None, 0, None, 1]
    assert store.queue_position("video_nope") is None


def test_claim_respects_limit_and_marks_the_owner(store: JobStore) -> None:
    ids = create(store, 5)
    assert store.claim("a", 0, 60) == []
    claimed = store.claim("a", 2, 60)
    assert len(claimed) == 2
    for job in claimed:
        assert (job.status, job.owner, job.attempts) == (IN_PROGRESS, "a", 1)
        assert store.get(job.id) == job
    rest = store.claim("b", 10, 60)
    assert sorted(j.id for j in claimed + rest) == ids
    assert {j.owner for j in rest} == {"b"}
    assert store.claim("c", 10, 60) == []


def test_claim_skips_cancelled_and_finished_jobs(store: JobStore) -> None:
    ids = create(store, 3)
    store.request_cancel(ids[0])
    assert store.finish(ids[1], "api", ended(store, ids[1], FAILED))
    assert [j.id for j in store.claim("a", 10, 60)] == [ids[2]]
    assert store.get(ids[0]).status == CANCELLED
    assert store.get(ids[1]).status == FAILED


def test_heartbeat_keeps_a_claim_and_reports_one_taken_over(store: JobStore) -> None:
    kept, dropped = create(store, 2)
    store.claim("a", 2, IDLE_S)
    time.sleep(PAST_IDLE_S)
    assert store.heartbeat("a", {kept: 3}) == []  # only `kept` is refreshed
    taken = store.claim("b", 10, IDLE_S)
    assert [j.id for j in taken] == [dropped]
    assert (taken[0].owner, taken[0].attempts, taken[0].status) == ("b", 2, IN_PROGRESS)
    assert store.heartbeat("a", {kept: 4, dropped: 5}) == [dropped]
    assert store.get(kept).progress == 4
    assert store.get(kept).owner == "a"
    assert store.get(dropped).owner == "b"


def test_takeover_after_idle_and_the_first_finish_wins(store: JobStore) -> None:
    (job_id,) = create(store, 1)
    assert [j.id for j in store.claim("a", 1, IDLE_S)] == [job_id]
    assert store.claim("b", 1, IDLE_S) == []  # just claimed: not idle
    time.sleep(PAST_IDLE_S)
    taken = store.claim("b", 1, IDLE_S)
    assert [(j.id, j.owner, j.attempts) for j in taken] == [(job_id, "b", 2)]
    assert store.heartbeat("a", {job_id: 2}) == [job_id]
    first = ended(store, job_id, COMPLETED, artifact=True, expires_at=time.time() + 3600)
    assert store.finish(job_id, "b", first)
    slow = ended(store, job_id, FAILED)
    assert not store.finish(job_id, "a", slow)  # the slow replica's result is dropped
    assert store.get(job_id) == first
    assert store.heartbeat("b", {job_id: 4}) == [job_id]  # finished: no one runs it
    assert store.claim("c", 1, 0.0) == []


def test_finish_is_idempotent(store: JobStore) -> None:
    (job_id,) = create(store, 1)
    store.claim("a", 1, 60)
    first = ended(store, job_id, COMPLETED, artifact=True)
    assert store.finish(job_id, "a", first)
    assert not store.finish(job_id, "a", ended(store, job_id, FAILED))
    assert store.get(job_id) == first
    assert not store.finish("video_nope", "a", first)


def test_release_puts_a_job_back_for_another_replica(store: JobStore) -> None:
    (job_id,) = create(store, 1)
    store.claim("a", 1, 60)
    store.heartbeat("a", {job_id: 2})
    store.release(job_id, "a")
    back = store.get(job_id)
    assert (back.status, back.owner, back.progress) == (QUEUED, None, 0)
    assert store.count_queued() == 1
    assert store.heartbeat("a", {job_id: 3}) == [job_id]
    taken = store.claim("b", 5, 60)
    assert [(j.id, j.owner, j.attempts) for j in taken] == [(job_id, "b", 2)]
    store.release(job_id, "a")  # not a's any more: nothing happens
    assert store.get(job_id).owner == "b"
    assert store.count_queued() == 0


def test_cancel_a_queued_job_ends_it_now(store: JobStore) -> None:
    (job_id,) = create(store, 1)
    now = store.request_cancel(job_id)
    assert now.status == CANCELLED and now.completed_at is not None
    assert store.get(job_id).status == CANCELLED
    assert store.count_queued() == 0
    assert store.claim("a", 5, 0.0) == []
    assert not store.finish(job_id, "a", ended(store, job_id, COMPLETED))
    assert store.request_cancel("video_nope") is None


def test_a_job_cancelled_while_queued_expires_like_any_other(store: JobStore) -> None:
    """Retention must reach records no replica ever finished: the cancel gives their expiry."""
    (job_id,) = create(store, 1)
    now = time.time()
    assert store.request_cancel(job_id, expires_at=now + 5).expires_at == now + 5
    assert store.expired(now, keep_completed=10) == []
    assert [r.id for r in store.expired(now + 6, keep_completed=10)] == [job_id]
    assert store.get(job_id) is None


def test_cancel_a_running_job_flags_it_for_its_replica(store: JobStore) -> None:
    job_id, other = create(store, 2)
    store.claim("a", 2, 60)
    assert store.cancel_requested([job_id, other]) == set()
    assert store.request_cancel(job_id).status == IN_PROGRESS
    assert store.cancel_requested([job_id, other]) == {job_id}
    assert store.cancel_requested([]) == set()
    assert store.heartbeat("a", {job_id: 1, other: 1}) == []  # still a's, until it stops
    assert store.finish(job_id, "a", ended(store, job_id, CANCELLED))
    assert store.get(job_id).status == CANCELLED


def test_delete(store: JobStore) -> None:
    queued, running = create(store, 2)
    assert store.delete(queued).id == queued
    assert store.get(queued) is None
    assert store.count_queued() == 1
    store.claim("a", 5, 60)
    assert store.delete(running).id == running
    assert store.heartbeat("a", {running: 2}) == [running]  # its replica learns it is gone
    assert not store.finish(running, "a", record(running))
    assert store.list(None, 10, "asc") == ([], False)
    assert store.delete(running) is None
    assert store.claim("b", 5, 0.0) == []


def test_expired_by_ttl_then_by_count(store: JobStore) -> None:
    old, newer, newest, failed, cancelled, running = create(store, 6)
    now = time.time()
    store.claim("a", 6, 60)
    store.finish(old, "a", ended(store, old, COMPLETED, artifact=True, expires_at=now - 10))
    store.finish(newer, "a", ended(store, newer, COMPLETED, artifact=True, expires_at=now + 3600))
    store.finish(newest, "a", ended(store, newest, COMPLETED, artifact=True, expires_at=now + 3600))
    store.finish(failed, "a", ended(store, failed, FAILED, expires_at=now - 1))
    store.finish(cancelled, "a", ended(store, cancelled, CANCELLED))
    assert {r.id for r in store.expired(now, keep_completed=10)} == {old, failed}
    assert store.get(old) is None and store.get(failed) is None
    gone = store.expired(now, keep_completed=1)  # the oldest completed beyond one
    assert [(r.id, r.artifact) for r in gone] == [(newer, video_key(newer))]
    assert store.expired(now, keep_completed=1) == []
    assert {r.id for r in store.list(None, 10, "asc")[0]} == {newest, cancelled, running}


def test_two_replicas_claim_each_job_exactly_once(store: JobStore) -> None:
    ids = create(store, 20)
    claimed: dict[str, list[str]] = {"a": [], "b": []}
    lost: list[str] = []
    deadline = time.monotonic() + 120  # guards a hang only

    def replica(name: str) -> None:
        mine = claimed[name]
        while time.monotonic() < deadline and len(claimed["a"]) + len(claimed["b"]) < len(ids):
            mine.extend(job.id for job in store.claim(name, 3, 60))
            lost.extend(store.heartbeat(name, dict.fromkeys(mine, 1)))

    threads = [threading.Thread(target=replica, args=(name,)) for name in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(claimed["a"] + claimed["b"]) == ids  # all claimed, none twice
    assert lost == []
    for name, mine in claimed.items():
        assert {store.get(job_id).owner for job_id in mine} <= {name}


# ---- Redis only ---------------------------------------------------------------------------------


def test_redis_names_the_stream_and_group_the_autoscaler_watches(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = RedisJobStore(redis_url)  # the default prefix
    try:
        create(store, 2)
        (group,) = client.xinfo_groups("reelserve:queue")  # there from the first job on, before any claim
        assert (group["name"], group["lag"], group["pending"]) == ("reelserve-workers", 2, 0)
        store.claim("replica-1", 1, 60)
        (group,) = client.xinfo_groups("reelserve:queue")
        assert (group["lag"], group["pending"]) == (1, 1)
        assert [c["name"] for c in client.xinfo_consumers("reelserve:queue", "reelserve-workers")] == ["replica-1"]
        assert store.requeue_all() == 0  # idle claims are taken over instead
    finally:
        store.close()
        client.close()


def test_redis_keeps_the_groups_lag_known_and_trims_the_stream(redis_service: RedisService) -> None:
    """The autoscaler scales on the group's lag; Redis reports it unknown once an entry at or past
    the last delivered one is XDEL'd, so finished jobs' entries are acknowledged and trimmed."""
    import redis

    store = RedisJobStore(redis_service.url(), prefix=redis_service.prefix())
    client = redis.Redis.from_url(redis_service.url(), decode_responses=True)
    try:
        first, second, waiting = create(store, 3)
        store.claim("a", 2, 60)
        store.finish(second, "a", ended(store, second, COMPLETED))  # the last delivered entry
        store.create(record("video_new"))
        (group,) = client.xinfo_groups(store.stream)
        assert (group["lag"], group["pending"]) == (2, 1)  # waiting + video_new; first runs
        store.finish(first, "a", ended(store, first, FAILED))
        store.claim("a", 5, 60)
        for job_id in (waiting, "video_new"):
            store.finish(job_id, "a", ended(store, job_id, COMPLETED))
        store.claim("a", 5, 60)
        (group,) = client.xinfo_groups(store.stream)
        assert (group["lag"], group["pending"]) == (0, 0)
        assert client.xlen(store.stream) <= 1  # only the last delivered entry is kept
    finally:
        client.close()
        store.close()


def test_redis_a_dead_replicas_job_flagged_to_cancel_ends_cancelled(redis_service: RedisService) -> None:
    store = RedisJobStore(redis_service.url(), prefix=redis_service.prefix())
    try:
        (job_id,) = create(store, 1)
        store.claim("a", 1, IDLE_S)
        store.request_cancel(job_id)
        time.sleep(PAST_IDLE_S)
        assert store.claim("b", 1, IDLE_S) == []  # nobody would ever see the flag: it ends here
        assert store.get(job_id).status == CANCELLED
        assert store.get(job_id).completed_at is not None
    finally:
        store.close()


def test_redis_unreachable_is_store_unavailable_without_the_password() -> None:
    port = free_port()  # nothing listens there
    store = RedisJobStore(f"redis://:hunter2@127.0.0.1:{port}/0")
    try:
        for call in (store.check, lambda: store.get("video_a"), lambda: store.claim("a", 1, 60)):
            with pytest.raises(StoreUnavailable) as caught:
                call()
            assert f"127.0.0.1:{port}" in str(caught.value)
            assert "hunter2" not in str(caught.value)
    finally:
        store.close()
