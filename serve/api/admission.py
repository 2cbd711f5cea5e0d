"""One admission queue for both entry points, in arrival order.

`POST /generate` and `POST /v1/videos` are both admitted here, on the event loop, as they arrive:
a request gets a place if fewer than `max_queue` requests are waiting (this replica's engine
queue, plus the jobs waiting in the job store, plus creates that hold a place while their record
is written), and a 429 with Retry-After otherwise. Neither route can crowd out the other: before,
`/generate` (async) took every free place in a burst while `/v1/videos` (a sync handler) waited
for a thread-pool slot to even ask. Called from the event loop only, which makes the check and
the reservation one step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from serve.api.jobs import JobService
from serve.engine.client import EngineClient, QueueFull


class Admission:
    def __init__(self, engine: EngineClient, jobs: JobService, max_queue: int) -> None:
        self.engine, self.jobs, self.max_queue = engine, jobs, max_queue
        self._held = 0  # places reserved by admitted requests not yet in the engine or the store

    def waiting(self) -> int:
        return self.engine.waiting_count() + self.jobs.store.count_queued() + self._held

    @contextlib.contextmanager
    def place(self) -> Iterator[None]:
        """Hold a place while the request is handed over (into the engine's queue or the job
        store, which count it from then on); raises QueueFull when there is none."""
        if self.waiting() >= self.max_queue:
            raise QueueFull(self.max_queue, self.engine.retry_after_s())
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
