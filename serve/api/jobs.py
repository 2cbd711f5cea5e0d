"""The job API's service: records in a `JobStore`, videos and uploaded images in an `ArtifactStore`,
and `JobRunner`, the thread that runs the store's jobs on this replica's engine.

`create` only writes the record (and the image) and returns: nothing is lost if this process dies
next. The runner claims queued jobs when the engine has room, heartbeats its claims with the
jobs' progress (so another replica, or this one after a restart, knows they are alive), passes
cancel flags on to the engine, and writes each outcome back. With the embedded SQLite store, jobs
a killed process had claimed are queued again at start; with Redis, another replica takes them
over once their claims have been idle for `claim_idle_s`. Either way they run again with the
same seed, so they give the same video.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from serve.config import ServerConfig
from serve.engine.client import (
    ARTIFACTS,
    SCRATCH,
    DuplicateRequest,
    EngineClient,
    EngineUnavailable,
    GenerationFailed,
    GenerationResult,
    QueueFull,
)
from serve.engine.request import GenerationParams, RequestStatus
from serve.jobs.artifacts import (
    STORAGE_FAILED,
    ArtifactStore,
    ArtifactStoreError,
    LocalArtifactStore,
    cause_of,
)
from serve.jobs.records import (
    CANCELLED,
    COMPLETED,
    FAILED,
    IN_PROGRESS,
    QUEUED,
    JobRecord,
    image_key,
    video_key,
    with_image,
)
from serve.jobs.sqlite import SqliteJobStore
from serve.jobs.store import JobStore, StoreUnavailable
from serve.jobs.webhooks import WebhookSender

log = logging.getLogger(__name__)

# RequestStatus of a job running on this replica -> the API's job status.
JOB_STATUS = {
    RequestStatus.WAITING: QUEUED,
    RequestStatus.ENCODING: IN_PROGRESS,
    RequestStatus.DENOISING: IN_PROGRESS,
    RequestStatus.DECODING: IN_PROGRESS,
    RequestStatus.FINISHED: COMPLETED,
    RequestStatus.FAILED: FAILED,
    RequestStatus.CANCELLED: CANCELLED,
}
# How often the runner claims, heartbeats and looks for cancel flags. A step of a real model takes
# seconds, so a claim is refreshed and a cancel seen within one step.
TICK_S = 0.1
PRUNE_EVERY_S = 10.0
PROBE_EVERY_S = 2.0  # while the artifact store is unwritable, how often to try it again
SQLITE_FILE = "jobs.sqlite3"  # the embedded store, in the output directory


@dataclass(frozen=True)
class LiveState:
    """What the engine knows of a job running here, finer than the record: queue position, ETA."""

    status: str
    progress: int
    queue_position: int | None
    eta_s: float | None


class JobService:
    """What the `/v1/videos` routes call; owns the stores and the runner."""

    def __init__(
        self, store: JobStore, artifacts: ArtifactStore, engine: EngineClient, config: ServerConfig, model: str
    ) -> None:
        self.store, self.artifacts, self.engine, self.model = store, artifacts, engine, model
        self.config = config
        self.runner = JobRunner(self, replica=f"replica-{uuid.uuid4().hex[:12]}")
        hooks = config.jobs
        self.webhooks = WebhookSender(hooks.webhook_urls, hooks.webhook_secret or "", hooks.webhook_attempts)

    def start(self) -> None:
        self.webhooks.start()
        self.runner.start()

    def stop(self) -> None:
        self.runner.stop()
        self.webhooks.stop()
        self.store.close()

    # ---- the routes' verbs ----------------------------------------------------------------------

    def create(self, params: GenerationParams, tenant: str | None = None) -> JobRecord:
        """Store the job (and its conditioning image) and return at once; the runner picks it up.
        Raises StoreUnavailable or ArtifactStoreError (admission is `serve.api.admission`'s)."""
        job_id = f"video_{uuid.uuid4().hex}"
        size = None
        if params.image is not None:
            size = (params.image.width, params.image.height)
            self.artifacts.put_bytes(image_key(job_id), params.image.rgb)
        record = JobRecord(
            job_id, self.model, _without_image(params), created_at=time.time(), image_size=size, tenant=tenant
        )
        self.store.create(record)
        self.runner.wake()
        return record

    def get(self, job_id: str, tenant: str | None = None) -> JobRecord | None:
        """The job, if it exists and belongs to `tenant` (another caller's job does not exist for
        this one: 404, not 403, so ids cannot be probed)."""
        record = self.store.get(job_id)
        return record if record is not None and record.tenant == tenant else None

    def list(
        self, after: str | None, limit: int, order: Literal["asc", "desc"], tenant: str | None = None
    ) -> tuple[list[JobRecord], bool]:
        """One page of `tenant`'s jobs. The stores index jobs by creation only, so with several
        callers this reads pages of all jobs and keeps the caller's (fine for thousands of jobs;
        a per-caller index would be the next step)."""
        page: list[JobRecord] = []
        cursor, more = after, True
        while more and len(page) <= limit:
            batch, more = self.store.list(cursor, max(100, limit + 1), order)
            page += [r for r in batch if r.tenant == tenant]
            cursor = batch[-1].id if batch else None
        return page[:limit], len(page) > limit

    def live(self, record: JobRecord) -> LiveState | None:
        """The engine's view of a job that runs on this replica now; for a job no replica has
        claimed yet, its place in the store's queue (None elsewhere or once done)."""
        if record.done:
            return None
        state = self.engine.request_state(record.id)
        if state is None:
            return self._unclaimed(record) if record.status == QUEUED else None
        eta = state["eta_s"]
        return LiveState(
            JOB_STATUS[state["status"]], state["progress"], state["queue_position"], None if eta is None else eta
        )

    def _unclaimed(self, record: JobRecord) -> LiveState | None:
        """A job waiting in the store: the queued jobs created before it, plus those this replica
        claimed that still wait for a worker (they run first; other replicas' engine queues are
        not known here). No ETA: that needs a worker's cost model."""
        position = self.store.queue_position(record.id)
        if position is None:  # claimed or ended meanwhile
            return None
        return LiveState(QUEUED, record.progress, position + self.engine.waiting_count(), None)

    def cancel(self, job_id: str) -> JobRecord | None:
        record = self.store.request_cancel(job_id, expires_at=time.time() + self.config.video_ttl_s)
        if record is not None:
            self.engine.cancel(job_id)  # at its next step, if it runs here; elsewhere its replica sees the flag
        return record

    def delete(self, job_id: str, tenant: str | None = None) -> bool:
        """Cancel it if it runs (here at once, elsewhere at its replica's next heartbeat) and delete
        its record, video and image."""
        if self.get(job_id, tenant) is None:
            return False
        self.engine.cancel(job_id)
        self.delete_artifacts(job_id)  # files first: a record is never gone while its files stay
        return self.store.delete(job_id) is not None

    def content(self, record: JobRecord):
        """The video's bytes in chunks, or None if its file is gone."""
        return None if record.artifact is None else self.artifacts.stream(record.artifact)

    def presigned_url(self, record: JobRecord) -> str | None:
        if not self.config.jobs.presigned_urls or record.artifact is None:
            return None
        return self.artifacts.url(record.artifact, self.config.jobs.presign_ttl_s)

    def delete_artifacts(self, job_id: str) -> None:
        for key in (video_key(job_id), image_key(job_id)):
            try:
                self.artifacts.delete(key)
            except ArtifactStoreError as e:  # retention tries again later; the record is gone already
                log.warning("could not delete %s: %s", key, e)

    def sweep_leftovers(self) -> None:
        """What a killed process left in this host's directories: half-written videos, and
        `/generate` results nobody collected. Only local stores this process owns (the output
        directory is locked to one process; S3 writes never leave a partial object)."""
        swept = 0
        for store in (self.engine.stores[SCRATCH], self.artifacts):
            if isinstance(store, LocalArtifactStore):
                swept += store.sweep_partial()
        scratch = self.engine.stores[SCRATCH]
        if isinstance(scratch, LocalArtifactStore):
            for path in (scratch.root / "videos").glob("*.mp4"):
                path.unlink(missing_ok=True)
                swept += 1
        if swept:
            log.info("removed %d file(s) a previous process left unfinished", swept)

    # ---- readiness ------------------------------------------------------------------------------

    @property
    def ready_problem(self) -> str | None:
        """Why this replica should get no new work now (None: it can take some)."""
        if self.runner.draining:
            return "shutting down: draining running work"
        if self.runner.unwritable is not None:
            return f"the artifact store is not writable: {self.runner.unwritable}"
        return None


class JobRunner:
    """The thread that runs the store's jobs on this replica's engine (see the module docstring)."""

    def __init__(self, service: JobService, replica: str) -> None:
        self.service = service
        self.replica = replica
        self.running: dict[str, Future[GenerationResult]] = {}  # job id -> the engine's future
        # Jobs this replica lost (deleted, or taken over) whose engine request has not ended yet:
        # a decode cannot be stopped, so its video may still be written and need deleting.
        self.abandoned: dict[str, Future[GenerationResult]] = {}
        self.draining = False
        self.unwritable: str | None = None  # why the artifact store failed, until a probe succeeds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last_prune = 0.0
        self._last_probe = 0.0
        self._last_heartbeat = 0.0
        self._reported: dict[str, int] = {}  # the progress the last heartbeat stored
        self._thread = threading.Thread(target=self._run, name="reelserve-jobs", daemon=True)

    @property
    def store(self) -> JobStore:
        return self.service.store

    @property
    def capacity(self) -> int:
        """Jobs this replica runs at once: what its workers can hold (claiming more would only
        queue them here, where no other replica can take them)."""
        return self.service.engine.num_workers * self.service.config.scheduler.max_running_per_worker

    def start(self) -> None:
        if self._thread.is_alive() or self._stop.is_set():
            return
        if not self.service.config.jobs.shared:
            requeued = self.store.requeue_all()
            if requeued:
                log.info("queued again %d job(s) that the previous process was running", requeued)
        self.service.sweep_leftovers()
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Give what still runs back to the store (queued again: another replica or the next start
        runs it), then stop the thread. Called before the engine stops, so the engine's
        "shutting down" failures never reach the records."""
        self.draining = True
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        self._try(self._settle_finished)  # what ended keeps its outcome; only the rest goes back
        for job_id in list(self.running):
            self._try(self.store.release, job_id, self.replica)
        self.running.clear()

    # ---- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except StoreUnavailable as e:  # Redis restarting, a disk hiccup: keep the jobs, try again
                log.warning("job store: %s", e)
                self._stop.wait(1.0)
            except Exception:
                log.exception("job runner tick failed")
                self._stop.wait(1.0)
            self._wake.wait(TICK_S)
            self._wake.clear()

    def tick(self) -> None:
        self._settle_finished()
        self._settle_abandoned()
        self._forward_cancels()
        self._heartbeat()
        self._probe_artifacts()
        if not self.draining and self.unwritable is None:
            self._claim()
        self.prune()

    def _settle_finished(self) -> None:
        """Write each ended job's outcome; it stays in `running` until the store has it (a store
        that fails meanwhile raises out of the tick, and the next tick tries again)."""
        for job_id, future in list(self.running.items()):
            if not future.done():
                continue
            try:
                self._finish(job_id, future)
            except StoreUnavailable:
                raise
            except Exception:  # a bug in one outcome must not wedge the runner for every job
                log.exception("could not settle job %s", job_id)
            del self.running[job_id]

    def _settle_abandoned(self) -> None:
        for job_id, future in list(self.abandoned.items()):
            if future.done():
                del self.abandoned[job_id]
                if not future.cancelled() and future.exception() is None and self.store.get(job_id) is None:
                    self.service.delete_artifacts(job_id)  # deleted while it decoded: drop its video

    def _forward_cancels(self) -> None:
        for job_id in self.store.cancel_requested(list(self.running)):
            self.service.engine.cancel(job_id)

    def _heartbeat(self) -> None:
        """Refresh the claims with the jobs' progress: whenever a step moved a job on, and at least
        every quarter of `claim_idle_s` (so a long step or decode is never mistaken for a death),
        but not every tick: each one is a durable write."""
        if not self.running:
            return
        progress = {}
        for job_id in self.running:
            state = self.service.engine.request_state(job_id)
            progress[job_id] = self._reported.get(job_id, 0) if state is None else state["progress"]
        due = time.monotonic() - self._last_heartbeat >= self.service.config.jobs.claim_idle_s / 4
        if not due and progress == self._reported:
            return
        lost = self.store.heartbeat(self.replica, progress)
        self._last_heartbeat, self._reported = time.monotonic(), progress  # only once it is stored
        for job_id in lost:
            # Deleted, or taken over by a replica that thought this one dead: stop spending on it.
            log.info("job %s is no longer this replica's; cancelling it here", job_id)
            self.service.engine.cancel(job_id)
            self.abandoned[job_id] = self.running.pop(job_id)

    def _claim(self) -> None:
        room = self.capacity - len(self.running)
        if room <= 0 or not self.service.engine.is_healthy():
            return
        idle_s = self.service.config.jobs.claim_idle_s
        for record in self.store.claim(self.replica, room, idle_s):
            if record.id in self.running:
                continue  # ours already (a claim refreshed late); it is running here
            self._submit(record)

    def _submit(self, record: JobRecord) -> None:
        params = record.params
        if record.image_size is not None:
            rgb = self.service.artifacts.get_bytes(image_key(record.id))
            if rgb is None:
                self._end(record, FAILED, error=("input_missing", "the job's input image is no longer stored"))
                return
            params = with_image(params, record.image_size, rgb)
        try:
            self.running[record.id] = self.service.engine.submit(params, record.id)
        except (QueueFull, EngineUnavailable, DuplicateRequest):
            # /generate took the room meanwhile, or its earlier run here has not ended: let it wait
            # in the store.
            self.store.release(record.id, self.replica)

    def _finish(self, job_id: str, future: Future[GenerationResult]) -> None:
        record = self.store.get(job_id)
        error = None if future.cancelled() else future.exception()
        if record is None:  # deleted while it ran: drop what it wrote
            if error is None:
                self.service.delete_artifacts(job_id)
            return
        if future.cancelled() or (isinstance(error, GenerationFailed) and error.cancelled):
            self._end(record, CANCELLED)
        elif isinstance(error, EngineUnavailable):  # the engine is going down: run it again later
            self.store.release(job_id, self.replica)
        elif error is not None:
            reason = getattr(error, "reason", str(error))
            storage = reason.startswith(STORAGE_FAILED)
            if storage:
                self._mark_unwritable(reason)
            self._end(record, FAILED, error=("storage_failed" if storage else "generation_failed", reason))
        else:
            result = future.result()
            record.artifact, record.timings, record.progress = result.artifact, result.timings, 100
            self._end(record, COMPLETED)

    def _end(self, record: JobRecord, status: str, error: tuple[str, str] | None = None) -> None:
        now = time.time()
        record.status, record.completed_at, record.owner = status, now, None
        record.error = None if error is None else {"code": error[0], "message": error[1]}
        record.expires_at = now + self.service.config.video_ttl_s
        if self.store.finish(record.id, self.replica, record):
            self.service.webhooks.job_ended(status, record.id)  # once per job: the finish that won
        else:
            log.info("job %s had already ended elsewhere; keeping that outcome", record.id)
        if record.image_size is not None:  # the conditioning image has served its purpose
            self._try_delete(image_key(record.id))

    # ---- the artifact store's health, and retention ---------------------------------------------

    def _mark_unwritable(self, reason: str) -> None:
        """A write failed: check the store itself (a single bad file is not a broken store)."""
        try:
            self.service.artifacts.check()
        except ArtifactStoreError as e:
            self.unwritable = cause_of(e)
            self._last_probe = time.monotonic()
            log.error("%s; not ready until it can be written again", e)

    def _probe_artifacts(self) -> None:
        if self.unwritable is None or time.monotonic() - self._last_probe < PROBE_EVERY_S:
            return
        self._last_probe = time.monotonic()
        try:
            self.service.artifacts.check()
        except ArtifactStoreError as e:
            self.unwritable = cause_of(e)
            return
        log.info("the artifact store is writable again")
        self.unwritable = None

    def prune(self, now: bool = False) -> None:
        """Delete expired jobs, and the oldest finished beyond `max_stored_videos`: records and
        files together. Every PRUNE_EVERY_S from the loop; `now` forces it (tests)."""
        if not now and time.monotonic() - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = time.monotonic()
        for record in self.store.expired(time.time(), self.service.config.max_stored_videos):
            self.service.delete_artifacts(record.id)

    def _try_delete(self, key: str) -> None:
        try:
            self.service.artifacts.delete(key)
        except ArtifactStoreError as e:
            log.warning("could not delete %s: %s", key, e)

    def _try(self, action, *args) -> None:
        try:
            action(*args)
        except StoreUnavailable as e:
            log.warning("job store: %s", e)


def open_job_service(config: ServerConfig, engine: EngineClient, model: str) -> JobService:
    """The configured job store and the engine's artifact store, both checked now: a server that
    cannot keep jobs refuses to start, naming the store (StoreUnavailable, ArtifactStoreError)."""
    store = open_job_store(config, engine.outputs.root)
    artifacts = engine.stores[ARTIFACTS]
    try:
        store.check()
        artifacts.check()
        engine.stores[SCRATCH].check()
    except Exception:
        store.close()
        raise
    return JobService(store, artifacts, engine, config, model)


def open_job_store(config: ServerConfig, root: Path) -> JobStore:
    if config.jobs.job_store == "sqlite":
        return SqliteJobStore(root / SQLITE_FILE)
    from serve.jobs.redis_store import RedisJobStore

    return RedisJobStore(config.jobs.job_store)


def _without_image(params: GenerationParams) -> GenerationParams:
    return dataclasses.replace(params, image=None)
