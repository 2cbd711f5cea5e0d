"""The shared job store: Redis, for several replicas behind one load balancer.

Layout under a key prefix P (default `reelserve`):

- `P:job:{id}`  a hash per job: `record` (JobRecord.to_json as last written whole: at create and
  finish) and the fields that change while it runs, kept apart so a Lua script can update them
  without re-encoding the JSON (cjson would round the timestamps): `status`, `owner`, `attempts`,
  `progress`, `completed_at` (JSON text), `cancel` ("1" when a client asked), `msg` (its entry in
  the stream), `seq` (creation order).
- `P:queue`     the work queue, a Stream read by the consumer group `P-workers`; each replica is a
  consumer named by its replica id. An entry is `job=<id>`. A claimed job's entry stays pending
  for its replica, which refreshes it each step (XCLAIM ... JUSTID resets its idle time); an
  entry idle longer than `claim_idle_s` is taken over by the next replica that claims
  (XAUTOCLAIM). The deploy's KEDA trigger watches this stream and group, so with the default
  prefix their names are fixed: `reelserve:queue`, `reelserve-workers`.
- `P:jobs`      sorted set of every job by `seq`: the listing's order (creation order, as SQLite's).
- `P:queued`    set of the jobs waiting (count_queued).
- `P:expiry`    finished jobs with an `expires_at`, scored by it; `P:stored` finished jobs that
  hold an artifact (not cancelled), by `seq`: what `expired` removes.

Every state change of a job is one Lua script, so two replicas never both claim, finish or
release the same job. An entry is acknowledged when its job finishes, is released or deleted,
and entries are never XDEL'd: a deleted entry at or after the group's last delivered one makes
Redis report the group's lag as unknown, and the autoscaler scales on that lag. Instead each
claim trims the stream (XTRIM MINID) below the oldest entry still pending or not yet delivered.
Entries of jobs that ended while queued (cancel, delete) stay until a replica reads and skips
them, so for a moment the lag counts them.

Plain Redis (or a Sentinel-managed primary), not Redis Cluster: the scripts touch keys they
compute from the prefix.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any, Literal

import redis

from serve.jobs.records import CANCELLED, JobRecord
from serve.jobs.store import StoreUnavailable

# Shared by every script: KEYS = [stream, queued, jobs, expiry, stored], ARGV[1] = prefix, ARGV[2] = group.
PRELUDE = """
local stream, queued, jobs, expiry, stored = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local prefix, group = ARGV[1], ARGV[2]
local function job_key(id) return prefix .. ':job:' .. id end
local function drop(msg)
  if msg and msg ~= '' then redis.call('XACK', stream, group, msg) end
end
local function remove(id)
  local key = job_key(id)
  local data = redis.call('HGETALL', key)
  if #data > 0 and redis.call('HGET', key, 'status') == 'in_progress' then
    drop(redis.call('HGET', key, 'msg'))
  end
  redis.call('DEL', key)
  redis.call('ZREM', jobs, id)
  redis.call('ZREM', expiry, id)
  redis.call('ZREM', stored, id)
  redis.call('SREM', queued, id)
  return data
end
"""

# ARGV: id, record, status, owner, attempts, progress, completed_at
CREATE = """
local id = ARGV[3]
local key = job_key(id)
if redis.call('EXISTS', key) == 1 then return 0 end
local seq = redis.call('INCR', prefix .. ':seq')
redis.call('HSET', key, 'record', ARGV[4], 'status', ARGV[5], 'owner', ARGV[6], 'attempts', ARGV[7],
           'progress', ARGV[8], 'completed_at', ARGV[9], 'cancel', '0', 'msg', '', 'seq', seq)
redis.call('ZADD', jobs, seq, id)
if ARGV[5] == 'queued' then
  redis.call('HSET', key, 'msg', redis.call('XADD', stream, '*', 'job', id))
  redis.call('SADD', queued, id)
end
return 1
"""

# ARGV: after ('' for none), limit, 'desc' or 'asc'. Returns limit + 1 ids, or nil: unknown cursor.
LIST = """
local after, limit, desc = ARGV[3], tonumber(ARGV[4]), ARGV[5] == 'desc'
local start = 0
if after ~= '' then
  local rank
  if desc then rank = redis.call('ZREVRANK', jobs, after) else rank = redis.call('ZRANK', jobs, after) end
  if not rank then return false end
  start = rank + 1
end
if desc then return redis.call('ZREVRANGE', jobs, start, start + limit) end
return redis.call('ZRANGE', jobs, start, start + limit)
"""

# ARGV: replica, limit, idle_ms, now (JSON). Returns the ids claimed.
CLAIM = """
local replica, limit, idle, now = ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
local got = {}
local function take(entry)
  if not entry then return end  -- Redis 6.2 reports an entry deleted under a pending claim as nil
  local msg, fields, id = entry[1], entry[2], nil
  for i = 1, #fields, 2 do if fields[i] == 'job' then id = fields[i + 1] end end
  if not id then drop(msg) return end
  local key = job_key(id)
  local h = redis.call('HMGET', key, 'status', 'msg', 'cancel')
  if (h[1] ~= 'queued' and h[1] ~= 'in_progress') or h[2] ~= msg then
    drop(msg)  -- the job is gone, ended, or queued again under a newer entry (trimmed later)
    return
  end
  if h[3] == '1' then
    -- asked to cancel while running, and its replica died: no one is left to see the flag
    redis.call('HSET', key, 'status', 'cancelled', 'owner', '', 'completed_at', now, 'msg', '')
    redis.call('SREM', queued, id)
    drop(msg)
    return
  end
  redis.call('HSET', key, 'status', 'in_progress', 'owner', replica)
  redis.call('HINCRBY', key, 'attempts', 1)
  redis.call('SREM', queued, id)
  got[#got + 1] = id
end
-- First the jobs of replicas that stopped refreshing their claims, then new ones.
local cursor = '0-0'
repeat
  local r = redis.call('XAUTOCLAIM', stream, group, replica, idle, cursor, 'COUNT', limit - #got)
  cursor = r[1]
  for _, entry in ipairs(r[2]) do take(entry) end
until cursor == '0-0' or #got >= limit
while #got < limit do
  local r = redis.call('XREADGROUP', 'GROUP', group, replica, 'COUNT', limit - #got, 'STREAMS', stream, '>')
  if not r or #r[1][2] == 0 then break end
  for _, entry in ipairs(r[1][2]) do take(entry) end
end
-- Trim below the oldest entry still needed: the oldest pending one, else the last delivered
-- (everything after it is not delivered yet). XTRIM, unlike XDEL, keeps the group's lag known.
local floor = redis.call('XPENDING', stream, group)[2]
if not floor then
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local fields = {}
    for i = 1, #info, 2 do fields[info[i]] = info[i + 1] end
    if fields['name'] == group then floor = fields['last-delivered-id'] end
  end
end
if floor and floor ~= '0-0' then redis.call('XTRIM', stream, 'MINID', floor) end
return got
"""

# ARGV: replica, then (id, progress) pairs. Returns the ids the replica no longer owns.
HEARTBEAT = """
local replica, lost = ARGV[3], {}
for i = 4, #ARGV, 2 do
  local id, progress = ARGV[i], tonumber(ARGV[i + 1])
  local key = job_key(id)
  local h = redis.call('HMGET', key, 'status', 'owner', 'msg', 'progress')
  if h[1] ~= 'in_progress' or h[2] ~= replica then
    lost[#lost + 1] = id
  else
    if progress > tonumber(h[4] or '0') then redis.call('HSET', key, 'progress', progress) end
    if h[3] and h[3] ~= '' then redis.call('XCLAIM', stream, group, replica, 0, h[3], 'JUSTID') end
  end
end
return lost
"""

# ARGV: id, now (JSON). Returns the hash as it now is, or nil.
REQUEST_CANCEL = """
local id, now, expires = ARGV[3], ARGV[4], ARGV[5]
local key = job_key(id)
local status = redis.call('HGET', key, 'status')
if not status then return false end
if status == 'queued' then
  -- its stream entry stays until a replica reads and drops it (see the module docstring)
  redis.call('HSET', key, 'status', 'cancelled', 'cancel', '1', 'completed_at', now)
  redis.call('SREM', queued, id)
  if expires ~= '' then
    redis.call('HSET', key, 'expires_at', expires)
    redis.call('ZADD', expiry, expires, id)
  end
elseif status == 'in_progress' then
  redis.call('HSET', key, 'cancel', '1')
end
return redis.call('HGETALL', key)
"""

# ARGV: id, record, status, owner, attempts, progress, completed_at, expires_at ('' for none),
# stored ('1' when it holds an artifact). Returns 1 if this call ended the job.
FINISH = """
local id = ARGV[3]
local key = job_key(id)
local h = redis.call('HMGET', key, 'status', 'msg', 'seq')
if h[1] ~= 'queued' and h[1] ~= 'in_progress' then return 0 end
if h[1] == 'in_progress' then drop(h[2]) end
redis.call('HSET', key, 'record', ARGV[4], 'status', ARGV[5], 'owner', ARGV[6], 'attempts', ARGV[7],
           'progress', ARGV[8], 'completed_at', ARGV[9], 'msg', '')
redis.call('SREM', queued, id)
if ARGV[10] ~= '' then redis.call('ZADD', expiry, ARGV[10], id) end
if ARGV[11] == '1' then redis.call('ZADD', stored, h[3], id) end
return 1
"""

# ARGV: id, replica
RELEASE = """
local id, replica = ARGV[3], ARGV[4]
local key = job_key(id)
local h = redis.call('HMGET', key, 'status', 'owner', 'msg')
if h[1] ~= 'in_progress' or h[2] ~= replica then return 0 end
drop(h[3])
local msg = redis.call('XADD', stream, '*', 'job', id)
redis.call('HSET', key, 'status', 'queued', 'owner', '', 'progress', 0, 'msg', msg)
redis.call('SADD', queued, id)
return 1
"""

# ARGV: id. Returns the hash as it was, or nil.
DELETE = """
local data = remove(ARGV[3])
if #data == 0 then return false end
return data
"""

# ARGV: now, keep_completed. Returns the hashes removed.
EXPIRED = """
local now, keep, gone = ARGV[3], tonumber(ARGV[4]), {}
local function collect(ids)
  for _, id in ipairs(ids) do
    local data = remove(id)
    if #data > 0 then gone[#gone + 1] = data end
  end
end
collect(redis.call('ZRANGEBYSCORE', expiry, '-inf', now))
local n = redis.call('ZCARD', stored)
if n > keep then collect(redis.call('ZRANGE', stored, 0, n - keep - 1)) end
return gone
"""


class RedisJobStore:
    def __init__(self, url: str, prefix: str = "reelserve") -> None:
        # Timeouts only guard against a hung server; every call is a few small commands.
        self._redis = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=10, socket_timeout=30, health_check_interval=30
        )
        self.location = _location(self._redis)
        self.prefix = prefix
        self.stream = f"{prefix}:queue"
        self.group = f"{prefix}-workers"
        self._group_made = False
        self._keys = [self.stream, f"{prefix}:queued", f"{prefix}:jobs", f"{prefix}:expiry", f"{prefix}:stored"]
        self._scripts = {
            name: self._redis.register_script(PRELUDE + body)
            for name, body in {
                "create": CREATE,
                "list": LIST,
                "claim": CLAIM,
                "heartbeat": HEARTBEAT,
                "request_cancel": REQUEST_CANCEL,
                "finish": FINISH,
                "release": RELEASE,
                "delete": DELETE,
                "expired": EXPIRED,
            }.items()
        }

    # ---- records --------------------------------------------------------------------------------

    def create(self, record: JobRecord) -> None:
        if not self._run("create", record.id, *_fields(record)):
            raise ValueError(f"job {record.id} already exists in the job store {self.location}")

    def get(self, job_id: str) -> JobRecord | None:
        with self._reachable():
            fields = self._redis.hgetall(self._job_key(job_id))
        return _record(fields) if fields else None

    def list(self, after: str | None, limit: int, order: Literal["asc", "desc"]) -> tuple[list[JobRecord], bool]:
        ids = self._run("list", after or "", max(limit, 0), order)
        if ids is None:  # the cursor is no job (any more): the listing ends, as SQLite's does
            return [], False
        return self._records(ids[:limit]), len(ids) > limit

    def count_queued(self) -> int:
        with self._reachable():
            return int(self._redis.scard(self._keys[1]))

    def queue_position(self, job_id: str) -> int | None:
        # Two reads, not a script: a position is a hint that is stale a moment later anyway.
        with self._reachable():
            queued = self._redis.smembers(self._keys[1])
            if job_id not in queued:
                return None
            ids = sorted(queued)
            seqs = dict(zip(ids, self._redis.zmscore(self._keys[2], ids), strict=True))
        mine = seqs[job_id]
        if mine is None:  # deleted between the two reads
            return None
        return sum(1 for seq in seqs.values() if seq is not None and seq < mine)

    # ---- claims ---------------------------------------------------------------------------------

    def claim(self, replica: str, limit: int, idle_s: float) -> list[JobRecord]:
        if limit <= 0:
            return []
        ids = self._run("claim", replica, limit, max(0, int(idle_s * 1000)), json.dumps(time.time()))
        return self._records(ids)

    def heartbeat(self, replica: str, progress: dict[str, int]) -> list[str]:
        if not progress:
            return []
        pairs = [value for job_id, step in progress.items() for value in (job_id, int(step))]
        return list(self._run("heartbeat", replica, *pairs))

    def request_cancel(self, job_id: str, expires_at: float | None = None) -> JobRecord | None:
        expires = "" if expires_at is None else repr(float(expires_at))
        fields = self._run("request_cancel", job_id, json.dumps(time.time()), expires)
        return _record(_pairs(fields)) if fields else None

    def cancel_requested(self, job_ids: list[str]) -> set[str]:
        if not job_ids:
            return set()
        with self._reachable():
            pipe = self._redis.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hget(self._job_key(job_id), "cancel")
            flags = pipe.execute()
        return {job_id for job_id, flag in zip(job_ids, flags, strict=True) if flag == "1"}

    def finish(self, job_id: str, replica: str, record: JobRecord) -> bool:
        """The first finish of an open job wins, whichever replica ran it (a slow replica whose
        job was taken over may still finish first: same seed, same video)."""
        expires = "" if record.expires_at is None else repr(float(record.expires_at))
        stored = "1" if record.status != CANCELLED and record.artifact is not None else "0"
        return bool(self._run("finish", job_id, *_fields(record), expires, stored))

    def release(self, job_id: str, replica: str) -> None:
        self._run("release", job_id, replica)

    def requeue_all(self) -> int:
        """Nothing to do: a dead replica's jobs are taken over once their claims go idle."""
        return 0

    def delete(self, job_id: str) -> JobRecord | None:
        """The running replica learns it from `heartbeat` (the id comes back as no longer owned)."""
        fields = self._run("delete", job_id)
        return _record(_pairs(fields)) if fields else None

    def expired(self, now: float, keep_completed: int) -> list[JobRecord]:
        gone = self._run("expired", repr(float(now)), max(keep_completed, 0))
        return [_record(_pairs(fields)) for fields in gone]

    def check(self) -> None:
        probe = f"{self.prefix}:probe"
        with self._reachable():
            self._redis.ping()
            self._redis.set(probe, "reelserve write probe", ex=60)
            self._redis.delete(probe)
            self._create_group()

    def close(self) -> None:
        self._redis.close()

    # ---- plumbing -------------------------------------------------------------------------------

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _records(self, ids: list[str]) -> list[JobRecord]:
        """The records of `ids`, in that order; one deleted meanwhile is left out."""
        if not ids:
            return []
        with self._reachable():
            pipe = self._redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self._job_key(job_id))
            found = pipe.execute()
        return [_record(fields) for fields in found if fields]

    def _run(self, name: str, *args: Any) -> Any:
        script = self._scripts[name]
        argv = [self.prefix, self.group, *args]
        with self._reachable():
            if not self._group_made:  # before the first job too: the autoscaler reads the group
                self._create_group()
            try:
                return script(keys=self._keys, args=argv)
            except redis.ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
            # The data was flushed under us: make the group again, then retry once.
            self._create_group()
            return script(keys=self._keys, args=argv)

    def _create_group(self) -> None:
        try:
            # From id 0: entries added before the group existed are work too.
            self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._group_made = True

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as e:
            # redis-py's messages name host:port, never the password; we name it from our side too.
            raise StoreUnavailable(f"the job store {self.location} failed: {type(e).__name__}: {e}") from e


def _fields(record: JobRecord) -> list[str]:
    """The record and its live fields as CREATE and FINISH take them (ARGV 4-9)."""
    return [
        record.to_json(),
        record.status,
        record.owner or "",
        str(record.attempts),
        str(record.progress),
        json.dumps(record.completed_at),
    ]


def _record(fields: dict[str, str]) -> JobRecord:
    """A hash back into a record: the JSON, with the live fields laid over it."""
    record = JobRecord.from_json(fields["record"])
    record.status = fields.get("status", record.status)
    record.owner = fields.get("owner") or None
    record.attempts = int(fields.get("attempts", record.attempts))
    record.progress = int(fields.get("progress", record.progress))
    completed = fields.get("completed_at")
    if completed:
        record.completed_at = json.loads(completed)
    if fields.get("expires_at"):  # set by a cancel while queued (finish writes it into the JSON)
        record.expires_at = float(fields["expires_at"])
    return record


def _pairs(flat: list[str]) -> dict[str, str]:
    """HGETALL as a Lua script returns it (a flat list) into a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _location(client: redis.Redis) -> str:
    """`redis://host:port/db` (or the socket path): what messages name, never with the password."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    scheme = "rediss" if client.connection_pool.connection_class.__name__ == "SSLConnection" else "redis"
    return f"{scheme}://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
