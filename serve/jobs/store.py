"""The `JobStore` protocol: job records, the work queue, claims, progress and cancel flags.

A job is created `queued`; a replica `claim`s it when it has capacity (it becomes `in_progress`,
owned by that replica) and `heartbeat`s its claim with its progress while it runs; a claim not
refreshed for `claim_idle_s` is taken over by the next replica that claims (the job runs again
with the same seed). Finishing is idempotent by job id: the first `finish` wins, so a job taken
over from a replica that was only slow still ends once. Implementations: `SqliteJobStore`
(embedded, one process), `RedisJobStore` (shared by replicas; the queue is a Redis Stream).
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from serve.jobs.records import JobRecord


class StoreUnavailable(Exception):
    """The job store cannot be reached or written (the message names it, never a secret)."""


@runtime_checkable
class JobStore(Protocol):
    def create(self, record: JobRecord) -> None:
        """Store a new `queued` record and put it on the work queue."""

    def get(self, job_id: str) -> JobRecord | None: ...

    def list(self, after: str | None, limit: int, order: Literal["asc", "desc"]) -> tuple[list[JobRecord], bool]:
        """One page by creation time after the cursor `after` (a job id), and whether more follow."""

    def count_queued(self) -> int:
        """Jobs waiting for a replica (admission control)."""

    def queue_position(self, job_id: str) -> int | None:
        """How many queued jobs were created before this one (claims take them in that order);
        None unless this one is queued."""

    def claim(self, replica: str, limit: int, idle_s: float) -> list[JobRecord]:
        """Up to `limit` jobs for `replica` to run: queued ones, and running ones whose owner has
        not refreshed its claim for `idle_s` (taken over). Each comes back `in_progress`, owned
        by `replica`, `attempts` incremented. Jobs cancelled or finished meanwhile are skipped."""

    def heartbeat(self, replica: str, progress: dict[str, int]) -> list[str]:
        """Refresh `replica`'s claims on these running jobs and store their progress. Returns the
        ids among them that `replica` no longer owns (taken over or deleted): stop running them."""

    def request_cancel(self, job_id: str, expires_at: float | None = None) -> JobRecord | None:
        """Cancel: a queued job ends `cancelled` now (kept until `expires_at`); a running one is
        flagged for its replica. Returns the record as it now is (None: no such job)."""

    def cancel_requested(self, job_ids: list[str]) -> set[str]:
        """Those of `job_ids` that a client asked to cancel."""

    def finish(self, job_id: str, replica: str, record: JobRecord) -> bool:
        """Store the final state (completed with its artifact, failed with its error, cancelled)
        if the job is still open; False if it had already ended (the caller drops its artifact)."""

    def release(self, job_id: str, replica: str) -> None:
        """Give a claimed job back to the queue (shutdown with work left): another replica, or
        this one after a restart, runs it again."""

    def requeue_all(self) -> int:
        """Embedded store only, at start: the previous process is gone, so every job it had
        claimed is queued again. Returns how many."""

    def delete(self, job_id: str) -> JobRecord | None:
        """Remove the record (the caller deletes its artifacts). A replica running it learns at its
        next `heartbeat` (the id comes back as no longer owned) and stops."""

    def expired(self, now: float, keep_completed: int) -> list[JobRecord]:
        """Finished records past `expires_at`, and the oldest completed beyond `keep_completed`,
        removed from the store (the caller deletes their artifacts)."""

    def check(self) -> None:
        """Raise StoreUnavailable unless the store can be read and written."""

    def close(self) -> None: ...
