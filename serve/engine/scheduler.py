"""Step-level scheduling across requests and workers. Pure Python: data in, data out (no torch).

Each call to `schedule(idle_workers)` picks at most one unit of work per idle worker:

1. text-encode a batch of waiting requests (this admits them to that worker, which then holds
   their latents until they finish: affinity),
2. decode one request whose steps are all done,
3. one denoising step for a batch of requests with the same BatchKey and the same expert for
   their next step (they may be at different steps: the transformer takes one timestep per sample).

Workers report back through `update_from_output`, which advances request state. Cancellation and
deadlines take effect at step boundaries: a request in a running unit is removed when the unit
returns, and the worker is told to free it.

A worker with a decode lane (`--vae-overlap`) takes a decode unit onto it (`MovedToLane`) and is free
for the next unit while the decode runs; the decode's requests stay on that worker (they count
towards its `max_running_per_worker`) until the decode's own result comes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from serve.engine.batch_key import BatchKey, TokenCounter, batch_key
from serve.engine.config import SchedulerConfig
from serve.engine.cost_model import CostModel
from serve.engine.request import Request, RequestStatus

UnitKind = Literal["encode", "denoise", "decode"]

# How often a request that was mid-way on a worker that died is started over before it fails.
MAX_RETRIES = 1


class QueueFullError(Exception):
    def __init__(self, max_queue: int) -> None:
        super().__init__(f"the queue is full ({max_queue} requests waiting)")
        self.max_queue = max_queue


@dataclass(frozen=True)
class WorkUnit:
    kind: UnitKind
    worker: int
    request_ids: tuple[str, ...]
    expert: int | None = None


@dataclass(frozen=True)
class UnitResult:
    """What a worker reports for one unit. `failed` lists requests that failed inside it."""

    unit: WorkUnit
    failed: dict[str, str] = field(default_factory=dict)
    experts: dict[str, tuple[int, ...]] = field(default_factory=dict)  # encode: each step's expert
    elapsed_s: float = 0.0
    on_lane: bool = False
    """A decode that ran on its worker's decode lane (its worker took other units meanwhile)."""


@dataclass(frozen=True)
class MovedToLane:
    """The worker took this decode unit onto its decode lane: it is free for the next unit now."""

    unit: WorkUnit


@dataclass(frozen=True)
class WorkerDied:
    worker: int
    reason: str


@dataclass
class SchedulerOutput:
    units: list[WorkUnit] = field(default_factory=list)
    free: dict[int, list[str]] = field(default_factory=dict)  # worker -> request ids to drop
    ended: list[Request] = field(default_factory=list)  # cancelled or expired in this call


def _decode_shape(r: Request) -> tuple[str, int, int, int]:
    key = r.batch_key
    return key.model, key.height, key.width, key.num_frames


def _alone(candidates: list[Request]) -> list[Request]:
    """A batch from these, oldest first: a retried request (its worker died while it ran) only by
    itself, so that if it kills its worker again nothing else dies with it."""
    if candidates and candidates[0].retries:
        return candidates[:1]
    return [r for r in candidates if not r.retries]


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        num_workers: int,
        tokens: TokenCounter,
        model: str = "model",
        quantization: str = "none",
    ) -> None:
        """`tokens`: the served model's sequence length for a size (its spec's `tokens`)."""
        self.config = config
        self.tokens = tokens
        self.num_workers = num_workers
        self.model = model
        self.quantization = quantization
        self.cost = CostModel()
        self.waiting: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.in_flight: dict[int, WorkUnit] = {}
        self.on_lane: dict[str, WorkUnit] = {}  # request id -> its decode unit on its worker's decode lane
        self.loaded_expert: dict[int, int | None] = dict.fromkeys(range(num_workers))
        self.swaps = 0
        self._alive: set[int] = set(range(num_workers))

    # ---- intake ---------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request. Its params must already be resolved (a preset applied: the batch key
        and step count must describe the run as it will happen)."""
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFullError(self.config.max_queue)
        request.batch_key = batch_key(request.params, self.model, self.tokens, self.quantization)
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def abort(self, request_id: str) -> bool:
        """Ask for cancellation; it takes effect at the next step boundary. False if unknown."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        request.cancel_requested = True
        return True

    # ---- schedule -------------------------------------------------------------------------------

    def schedule(self, idle_workers: list[int], now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        # Workers that can take work now or are working; a dead one (restarting) is neither,
        # and must not look "least loaded" to the placement rule.
        self._alive = set(idle_workers) | set(self.in_flight)
        self._end_cancelled_and_expired(now, out)
        for worker in idle_workers:
            if worker in self.in_flight:
                continue
            unit = self._pick(worker, now)
            if unit is not None:
                self._start(unit, now)
                out.units.append(unit)
        return out

    def _pick(self, worker: int, now: float) -> WorkUnit | None:
        """Encode first (new requests join the running batches sooner), then decode (finishing
        frees memory), then a denoising step; but a request idle for `max_wait_s` goes first."""
        starving = self._starving_unit(worker, now)
        return starving or self._encode_unit(worker) or self._decode_unit(worker) or self._denoise_unit(worker, now)

    def _starving_unit(self, worker: int, now: float) -> WorkUnit | None:
        idle = [r for r in self._schedulable(worker) if now - r.last_scheduled >= self.config.max_wait_s]
        if not idle:
            return None
        if any(r.status == RequestStatus.DECODING for r in idle):
            return self._decode_unit(worker)
        return self._denoise_unit(worker, now)

    def _encode_unit(self, worker: int) -> WorkUnit | None:
        room = self.config.max_running_per_worker - len(self._on_worker(worker))
        if not self.waiting or room <= 0 or not self._is_least_loaded(worker):
            return None
        take = min(room, self.config.max_batch_size, len(self.waiting))
        batch = _alone([self.waiting[i] for i in range(take)])
        return WorkUnit("encode", worker, tuple(r.request_id for r in batch))

    def _decode_unit(self, worker: int) -> WorkUnit | None:
        """The oldest finished request, with others of its shape (one VAE call decodes them all)."""
        ready = sorted(
            (r for r in self._schedulable(worker) if r.status == RequestStatus.DECODING), key=lambda r: r.arrival_time
        )
        if not ready:
            return None
        shape = _decode_shape(ready[0])
        batch = _alone([r for r in ready if _decode_shape(r) == shape][: self.config.max_batch_size])
        return WorkUnit("decode", worker, tuple(r.request_id for r in batch))

    def _denoise_unit(self, worker: int, now: float) -> WorkUnit | None:
        groups = self._denoise_groups(worker)
        if not groups:
            return None
        (key, expert), members = self._choose_group(worker, groups, now)
        batch = self._fill_batch(key, members)
        return WorkUnit("denoise", worker, tuple(r.request_id for r in batch), expert)

    def _denoise_groups(self, worker: int) -> dict[tuple[BatchKey, int], list[Request]]:
        groups: dict[tuple[BatchKey, int], list[Request]] = {}
        for r in self._on_worker(worker):
            if r.status == RequestStatus.DENOISING:
                groups.setdefault((r.batch_key, r.next_expert), []).append(r)
        for members in groups.values():
            members.sort(key=lambda r: r.arrival_time)
        return groups

    def _choose_group(self, worker: int, groups: dict, now: float):
        by_age = sorted(groups.items(), key=lambda kv: kv[1][0].arrival_time)
        if self.config.expert_policy == "fcfs":
            return by_age[0]
        starving = [kv for kv in by_age if now - kv[1][0].last_scheduled >= self.config.max_wait_s]
        if starving:
            return starving[0]
        same_expert = [kv for kv in by_age if kv[0][1] == self.loaded_expert[worker]]
        return (same_expert or by_age)[0]

    def _fill_batch(self, key: BatchKey, members: list[Request]) -> list[Request]:
        """Oldest first, up to the batch-size cap and the predicted-cost cap (at least one)."""
        tokens = key.tokens
        cap = self.config.max_batch_cost_s
        batch: list[Request] = []
        for r in _alone(members[: self.config.max_batch_size]):
            if batch and cap is not None and self.cost.batch_step_s(tokens, key.cfg, len(batch) + 1) > cap:
                break
            batch.append(r)
        return batch

    def _start(self, unit: WorkUnit, now: float) -> None:
        self.in_flight[unit.worker] = unit
        for rid in unit.request_ids:
            r = self.requests[rid]
            r.last_scheduled = now
            r.trace.append((unit.kind, unit.worker, len(unit.request_ids)))
            if unit.kind == "encode":
                self.waiting.remove(r)
                r.worker, r.status = unit.worker, RequestStatus.ENCODING
        if unit.kind == "denoise":
            previous = self.loaded_expert[unit.worker]
            if previous is not None and previous != unit.expert:
                self.swaps += 1
            self.loaded_expert[unit.worker] = unit.expert

    # ---- results --------------------------------------------------------------------------------

    def update_from_output(self, results: list[UnitResult | WorkerDied | MovedToLane]) -> list[Request]:
        """Advance state from worker reports; return requests that reached a final status."""
        ended: list[Request] = []
        for result in results:
            if isinstance(result, WorkerDied):
                ended += self._worker_died(result)
            elif isinstance(result, MovedToLane):
                self.in_flight.pop(result.unit.worker, None)
                # Only requests still here: after a drain (an engine error) a late report names gone ones.
                self.on_lane.update({rid: result.unit for rid in result.unit.request_ids if rid in self.requests})
            else:
                ended += self._unit_done(result)
        return ended

    def _unit_done(self, result: UnitResult) -> list[Request]:
        unit = result.unit
        if result.on_lane:
            for rid in unit.request_ids:
                self.on_lane.pop(rid, None)
        else:
            self.in_flight.pop(unit.worker, None)
        ended = []
        for rid in unit.request_ids:
            r = self.requests.get(rid)
            if r is None:
                continue
            if rid in result.failed:
                ended.append(self._finish(r, RequestStatus.FAILED, result.failed[rid]))
                continue
            self._advance(r, unit, result)
            if r.status == RequestStatus.FINISHED:
                ended.append(self._finish(r, RequestStatus.FINISHED))
        return ended

    def _advance(self, r: Request, unit: WorkUnit, result: UnitResult) -> None:
        stage = {"encode": "text_encode", "denoise": "denoise", "decode": "decode"}[unit.kind]
        r.timings[stage] = r.timings.get(stage, 0.0) + result.elapsed_s
        if unit.kind == "encode":
            r.experts = result.experts[r.request_id]
            r.status = RequestStatus.DENOISING
        elif unit.kind == "denoise":
            r.step += 1
            if r.step >= r.total_steps:
                r.status = RequestStatus.DECODING
        else:
            r.status = RequestStatus.FINISHED

    def drain(self, reason: str) -> list[Request]:
        """Fail and forget every request (the engine is stopping, or its loop hit a bug)."""
        requests = list(self.requests.values())
        self.waiting.clear()
        self.in_flight.clear()
        self.on_lane.clear()
        return [self._finish(r, RequestStatus.FAILED, reason) for r in requests]

    def _worker_died(self, event: WorkerDied) -> list[Request]:
        """Its requests' latents died with it. One that had not started lost nothing and goes back
        to the queue. One that was mid-way, or in the unit that was running (a suspect), starts
        over from step 0 on any worker (its noise comes from its seed: the same video), once; after
        that it fails with the reason, since it may be what kills its worker. Retried requests run
        alone (`_alone`), so a batch-mate of the culprit is not failed with it."""
        unit = self.in_flight.pop(event.worker, None)
        suspects = set(unit.request_ids) if unit is not None else set()
        # A decode on its lane dies with the worker too; its requests are DECODING, so retried below.
        self.on_lane = {rid: u for rid, u in self.on_lane.items() if u.worker != event.worker}
        self.loaded_expert[event.worker] = None
        requeue, ended = [], []
        for r in self._on_worker(event.worker):
            if r.step > 0 or r.status == RequestStatus.DECODING or r.request_id in suspects:
                if r.retries >= MAX_RETRIES:
                    reason = f"{event.reason}; it had been retried once from its seed and died again"
                    ended.append(self._finish(r, RequestStatus.FAILED, reason))
                    continue
                r.retries += 1
            requeue.append(r)
        for r in sorted(requeue, key=lambda r: r.arrival_time, reverse=True):
            self._requeue(r)
        return ended

    def _requeue(self, r: Request) -> None:
        """Back to the front of the queue (these came before anything still waiting); the queue
        limit does not apply, it was admitted already."""
        r.status, r.worker, r.step, r.experts = RequestStatus.WAITING, None, 0, ()
        r.timings = {}  # the stages of the run that makes the video; the lost one counts as queue time
        self.waiting.appendleft(r)

    def _end_cancelled_and_expired(self, now: float, out: SchedulerOutput) -> None:
        busy = {rid for unit in self.in_flight.values() for rid in unit.request_ids} | set(self.on_lane)
        for r in list(self.requests.values()):
            if r.request_id in busy:
                continue  # at the next step boundary
            if r.cancel_requested:
                status, reason = RequestStatus.CANCELLED, "cancelled"
            elif now > r.deadline:
                status, reason = RequestStatus.FAILED, "deadline exceeded before the video was finished"
            else:
                continue
            if r.worker is not None:
                out.free.setdefault(r.worker, []).append(r.request_id)
            elif r in self.waiting:
                self.waiting.remove(r)
            out.ended.append(self._finish(r, status, reason))

    def _finish(self, r: Request, status: RequestStatus, error: str | None = None) -> Request:
        r.status, r.error = status, error
        self.requests.pop(r.request_id, None)
        return r

    # ---- load, ETA ------------------------------------------------------------------------------

    def _on_worker(self, worker: int) -> list[Request]:
        return [r for r in self.requests.values() if r.worker == worker]

    def _schedulable(self, worker: int) -> list[Request]:
        """The worker's requests that may go into a unit now: not those its decode lane holds."""
        return [r for r in self._on_worker(worker) if r.request_id not in self.on_lane]

    def remaining_s(self, r: Request) -> float:
        """Predicted seconds of transformer work left for one request, run alone."""
        key = r.batch_key
        return (r.total_steps - r.step) * self.cost.batch_step_s(key.tokens, key.cfg, 1)

    def worker_load_s(self, worker: int) -> float:
        return sum(self.remaining_s(r) for r in self._on_worker(worker))

    def _is_least_loaded(self, worker: int) -> bool:
        room = self.config.max_running_per_worker
        with_room = [w for w in sorted(self._alive) if len(self._on_worker(w)) < room]
        return not with_room or self.worker_load_s(worker) <= min(self.worker_load_s(w) for w in with_room)

    def eta_s(self, request_id: str) -> float | None:
        """Predicted seconds until this request's steps are done: serial work ahead of it on its
        worker (an upper bound: batching runs some of it concurrently), or for a waiting request
        the least-loaded worker's load plus the waiting work ahead of it shared over the workers."""
        r = self.requests.get(request_id)
        if r is None:
            return None
        if r.worker is not None:
            ahead = [o for o in self._on_worker(r.worker) if o.arrival_time <= r.arrival_time]
            return sum(self.remaining_s(o) for o in ahead)
        position = self.queue_position(request_id) or 0
        queued = sum(self.remaining_s(o) for o in list(self.waiting)[: position + 1])
        least = min((self.worker_load_s(w) for w in self._alive or range(self.num_workers)), default=0.0)
        return least + queued / self.num_workers

    def queue_position(self, request_id: str) -> int | None:
        for i, r in enumerate(self.waiting):
            if r.request_id == request_id:
                return i
        return None

    def counts(self) -> dict[str, int]:
        waiting = len(self.waiting)
        return {"waiting": waiting, "running": len(self.requests) - waiting}
