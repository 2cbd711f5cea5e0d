"""The embedded job store: one SQLite file (stdlib) in the output directory, owned by one process.

Durable across restarts: a record is committed before `POST /v1/videos` answers, and a job that
was queued or running when the process died is queued again at the next start (`requeue_all`;
it runs with the same seed, so it gives the same video). One process owns the file (an exclusive
lock beside it), which is what makes that requeue safe; several replicas share Redis instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import sqlite3
import threading
import time
from pathlib import Path
from typing import Literal

from serve.jobs.records import CANCELLED, DONE, IN_PROGRESS, QUEUED, JobRecord
from serve.jobs.store import StoreUnavailable

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order, the listing's cursor
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    owner TEXT,
    heartbeat REAL,                         -- when the owner last refreshed its claim
    cancel INTEGER NOT NULL DEFAULT 0,
    record TEXT NOT NULL                    -- JobRecord.to_json()
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""
OPEN = (QUEUED, IN_PROGRESS)


class SqliteJobStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()  # one connection, shared by the API threads and the job runner
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._owner = _exclusive(self.path.with_suffix(".lock"))
            # A short busy timeout: the lock is held meanwhile (an operator's `sqlite3` reading the
            # file must not stall the server for long).
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=1.0)
            # A rollback journal, not WAL: the write rate is low (creates, ends, a heartbeat per
            # step) and a WAL grows to megabytes before it is checkpointed, which a small output
            # volume does not have.
            self._db.execute("PRAGMA journal_mode=DELETE")
            self._db.execute("PRAGMA synchronous=FULL")  # a created job survives a power cut
            self._db.executescript(SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise StoreUnavailable(f"cannot open the job store {self.path}: {e}") from e

    # ---- records --------------------------------------------------------------------------------

    def create(self, record: JobRecord) -> None:
        self._write(
            "INSERT INTO jobs (id, status, owner, record) VALUES (?, ?, NULL, ?)",
            (record.id, record.status, record.to_json()),
        )

    def get(self, job_id: str) -> JobRecord | None:
        row = self._read_one("SELECT record FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else JobRecord.from_json(row[0])

    def list(self, after: str | None, limit: int, order: Literal["asc", "desc"]) -> tuple[list[JobRecord], bool]:
        descending = order == "desc"
        query, args = "SELECT record FROM jobs", []
        if after is not None:
            cursor = self._read_one("SELECT seq FROM jobs WHERE id = ?", (after,))
            if cursor is None:
                return [], False
            query += " WHERE seq < ?" if descending else " WHERE seq > ?"
            args.append(cursor[0])
        query += f" ORDER BY seq {'DESC' if descending else 'ASC'} LIMIT ?"
        rows = self._read(query, (*args, limit + 1))
        return [JobRecord.from_json(r[0]) for r in rows[:limit]], len(rows) > limit

    def count_queued(self) -> int:
        return self._read_one("SELECT COUNT(*) FROM jobs WHERE status = ?", (QUEUED,))[0]

    def queue_position(self, job_id: str) -> int | None:
        mine = self._read_one("SELECT seq FROM jobs WHERE id = ? AND status = ?", (job_id, QUEUED))
        if mine is None:
            return None
        return self._read_one("SELECT COUNT(*) FROM jobs WHERE status = ? AND seq < ?", (QUEUED, mine[0]))[0]

    # ---- claims ---------------------------------------------------------------------------------

    def claim(self, replica: str, limit: int, idle_s: float) -> list[JobRecord]:
        if limit <= 0:
            return []
        now = time.time()
        with self._transaction() as db:
            # A job whose replica died after a client asked to cancel it ends cancelled, not run again.
            for (text,) in db.execute(
                "SELECT record FROM jobs WHERE status = ? AND heartbeat < ? AND cancel = 1", (IN_PROGRESS, now - idle_s)
            ).fetchall():
                _end_cancelled(db, JobRecord.from_json(text), now)
            rows = db.execute(
                "SELECT record FROM jobs WHERE (status = ? OR (status = ? AND heartbeat < ?)) AND cancel = 0 "
                "ORDER BY seq LIMIT ?",
                (QUEUED, IN_PROGRESS, now - idle_s, limit),
            ).fetchall()
            claimed = []
            for (text,) in rows:
                record = JobRecord.from_json(text)
                record.status, record.owner, record.attempts = IN_PROGRESS, replica, record.attempts + 1
                db.execute(
                    "UPDATE jobs SET status = ?, owner = ?, heartbeat = ?, record = ? WHERE id = ?",
                    (IN_PROGRESS, replica, now, record.to_json(), record.id),
                )
                claimed.append(record)
        return claimed

    def heartbeat(self, replica: str, progress: dict[str, int]) -> list[str]:
        lost = []
        now = time.time()
        with self._transaction() as db:
            for job_id, value in progress.items():
                row = db.execute(
                    "SELECT record FROM jobs WHERE id = ? AND owner = ? AND status = ?", (job_id, replica, IN_PROGRESS)
                ).fetchone()
                if row is None:
                    lost.append(job_id)
                    continue
                record = JobRecord.from_json(row[0])
                record.progress = max(record.progress, value)
                db.execute("UPDATE jobs SET heartbeat = ?, record = ? WHERE id = ?", (now, record.to_json(), job_id))
        return lost

    def request_cancel(self, job_id: str, expires_at: float | None = None) -> JobRecord | None:
        with self._transaction() as db:
            row = db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            record = JobRecord.from_json(row[0])
            if record.status == QUEUED:
                record.expires_at = expires_at
                _end_cancelled(db, record, time.time())
            elif record.status == IN_PROGRESS:
                db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
        return record

    def cancel_requested(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        marks = ",".join("?" * len(job_ids))
        rows = self._read(f"SELECT id FROM jobs WHERE cancel = 1 AND id IN ({marks})", tuple(job_ids))
        return {r[0] for r in rows}

    def finish(self, job_id: str, replica: str, record: JobRecord) -> bool:
        """The first finish of an open job wins, whichever replica ran it (a slow replica whose
        job was taken over may still finish first: its video is as good, same seed)."""
        with self._transaction() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] in DONE:
                return False
            db.execute(
                "UPDATE jobs SET status = ?, owner = NULL, record = ? WHERE id = ?",
                (record.status, record.to_json(), job_id),
            )
        return True

    def release(self, job_id: str, replica: str) -> None:
        with self._transaction() as db:
            row = db.execute(
                "SELECT record FROM jobs WHERE id = ? AND owner = ? AND status = ?", (job_id, replica, IN_PROGRESS)
            ).fetchone()
            if row is not None:
                _requeue_or_cancel(db, JobRecord.from_json(row[0]), job_id)

    def requeue_all(self) -> int:
        now = time.time()
        with self._transaction() as db:
            rows = db.execute("SELECT record, cancel FROM jobs WHERE status = ?", (IN_PROGRESS,)).fetchall()
            for text, cancel in rows:
                record = JobRecord.from_json(text)
                _end_cancelled(db, record, now) if cancel else _requeue(db, record)
        return sum(1 for _, cancel in rows if not cancel)

    def delete(self, job_id: str) -> JobRecord | None:
        with self._transaction() as db:
            row = db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else JobRecord.from_json(row[0])

    def expired(self, now: float, keep_completed: int) -> list[JobRecord]:
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT record FROM jobs WHERE status IN ({','.join('?' * len(DONE))}) ORDER BY seq DESC", DONE
            ).fetchall()
            records = [JobRecord.from_json(r[0]) for r in rows]
            kept = [r for r in records if r.expires_at is None or r.expires_at > now]
            kept_ids = {r.id for r in kept}
            completed = [r for r in kept if r.status != CANCELLED and r.artifact is not None]
            gone = [r for r in records if r.id not in kept_ids] + completed[keep_completed:]
            for record in gone:
                db.execute("DELETE FROM jobs WHERE id = ?", (record.id,))
        return gone

    def check(self) -> None:
        try:
            with self._transaction() as db:
                db.execute("CREATE TABLE IF NOT EXISTS probe (x INTEGER)")
                db.execute("INSERT INTO probe VALUES (1)")
                db.execute("DELETE FROM probe")
        except sqlite3.Error as e:
            raise StoreUnavailable(f"the job store {self.path} is not writable: {e}") from e

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._owner.close()

    # ---- plumbing -------------------------------------------------------------------------------

    def _read(self, query: str, args: tuple) -> list[tuple]:
        with self._lock:
            return self._db.execute(query, args).fetchall()

    def _read_one(self, query: str, args: tuple) -> tuple | None:
        rows = self._read(query, args)
        return rows[0] if rows else None

    def _write(self, query: str, args: tuple) -> None:
        with self._transaction() as db:
            db.execute(query, args)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self._lock, self.path)


class _Transaction:
    """`BEGIN IMMEDIATE` ... `COMMIT` under the store's lock; any SQLite error is StoreUnavailable."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock, path: Path) -> None:
        self.db, self.lock, self.path = db, lock, path

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            self.lock.release()
            raise StoreUnavailable(f"the job store {self.path} failed: {e}") from e
        return self.db

    def __exit__(self, kind, error, traceback) -> None:
        try:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        except sqlite3.Error as e:
            # A failed COMMIT (locked, disk full, I/O error) leaves the transaction open: roll it
            # back, or every later BEGIN fails and the store is stuck until a restart.
            if self.db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            if kind is None:
                raise StoreUnavailable(f"the job store {self.path} failed: {e}") from e
        finally:
            self.lock.release()
        if isinstance(error, sqlite3.Error):
            raise StoreUnavailable(f"the job store {self.path} failed: {error}") from error


def _end_cancelled(db: sqlite3.Connection, record: JobRecord, now: float) -> None:
    record.status, record.completed_at, record.owner = CANCELLED, now, None
    db.execute(
        "UPDATE jobs SET status = ?, cancel = 1, owner = NULL, record = ? WHERE id = ?",
        (CANCELLED, record.to_json(), record.id),
    )


def _requeue_or_cancel(db: sqlite3.Connection, record: JobRecord, job_id: str) -> None:
    """A job given back is queued again, unless a client asked to cancel it meanwhile: then it
    ends cancelled (nobody would ever claim a queued job with the flag set)."""
    (cancel,) = db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if cancel:
        _end_cancelled(db, record, time.time())
    else:
        _requeue(db, record)


def _requeue(db: sqlite3.Connection, record: JobRecord) -> None:
    record.status, record.owner, record.progress = QUEUED, None, 0
    db.execute(
        "UPDATE jobs SET status = ?, owner = NULL, heartbeat = NULL, record = ? WHERE id = ?",
        (QUEUED, record.to_json(), record.id),
    )


def _exclusive(lock_path: Path):
    """Hold an exclusive lock on `lock_path` for the store's lifetime (released at exit, even
    on SIGKILL: the kernel drops it with the process)."""
    handle = lock_path.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StoreUnavailable(
            f"another reelserve process uses the job store {lock_path.parent}; give this one its own "
            "--output-dir, or share jobs between replicas with --job-store redis://HOST:PORT/DB"
        ) from None
    return handle
