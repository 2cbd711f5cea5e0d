"""Prometheus metrics of one engine (its own registry, so several engines in one process don't clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class EngineMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("reelserve_queue_depth", "Requests waiting for a worker", registry=r)
        self.running = Gauge("reelserve_running_requests", "Requests held by a worker", registry=r)
        self.requests = Counter("reelserve_requests", "Requests that ended, by status", ["status"], registry=r)
        self.step_seconds = Histogram(
            "reelserve_step_seconds", "Wall time of one batched denoising step", buckets=STEP_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "reelserve_batch_size", "Requests per denoising step", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r
        )
        self.expert_swaps = Counter("reelserve_expert_swaps", "Times a worker switched MoE expert", registry=r)
        self.stage_seconds = Histogram(
            "reelserve_stage_seconds", "Seconds per request and stage", ["stage"], buckets=STAGE_BUCKETS, registry=r
        )
        self.worker_restarts = Counter("reelserve_worker_restarts", "Worker processes restarted", registry=r)
        self.step_cache_steps = Counter(
            "reelserve_step_cache_steps", "Denoising steps with the step cache on, by outcome", ["outcome"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
