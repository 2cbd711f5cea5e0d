"""Prometheus metrics of one engine, named and labelled as vLLM's, so dashboards and alerts written
for vLLM (`vllm:num_requests_waiting`, `vllm:e2e_request_latency_seconds`, ...) carry over by
swapping the `vllm:` prefix for `reelserve:`. Every series has vLLM's `model_name` label (the served
model name). Each engine has its own registry, so several engines in one process don't clash.

vLLM's names used here: num_requests_running, num_requests_waiting, request_success_total
(every ended request, by `finished_reason`, aborted ones included as in vLLM),
e2e_request_latency_seconds, request_queue_time_seconds, request_inference_time_seconds. A video
model's own: denoising_step_time_seconds (one batched denoising step; a video's inter-token
latency), denoising_batch_size, request_stage_time_seconds{stage}, expert_swaps_total,
worker_restarts_total, step_cache_steps_total{outcome}, decode_overlapped_units_total (units a
worker ran while a decode was on its decode lane: the overlap `--vae-overlap` buys).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "reelserve:"
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# A video takes seconds to an hour: vLLM's request buckets stop at a few minutes.
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


class EngineMetrics:
    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.num_requests_running = self._gauge("num_requests_running", "Requests held by a worker")
        self.num_requests_waiting = self._gauge("num_requests_waiting", "Requests waiting for a worker")
        self.e2e_request_latency = self._histogram(
            "e2e_request_latency_seconds", "Seconds from arrival to the finished video", REQUEST_BUCKETS
        )
        self.request_queue_time = self._histogram(
            "request_queue_time_seconds", "Seconds a finished request waited for its worker", REQUEST_BUCKETS
        )
        self.request_inference_time = self._histogram(
            "request_inference_time_seconds", "Seconds a finished request spent on a worker", REQUEST_BUCKETS
        )
        self.denoising_step_time = self._histogram(
            "denoising_step_time_seconds", "Wall time of one batched denoising step", STEP_BUCKETS
        )
        self.denoising_batch_size = self._histogram(
            "denoising_batch_size", "Requests per denoising step", BATCH_BUCKETS
        )
        self.expert_swaps = self._counter("expert_swaps", "Times a worker switched MoE expert")
        self.worker_restarts = self._counter("worker_restarts", "Worker processes restarted")
        self.decode_overlapped_units = self._counter(
            "decode_overlapped_units", "Units a worker ran while a decode was on its decode lane"
        )
        self._request_success = Counter(
            PREFIX + "request_success",
            "Requests that ended, by finished_reason: finished, failed, cancelled (as vLLM, not only successes)",
            ["finished_reason", "model_name"],
            registry=self.registry,
        )
        self._stage_time = Histogram(
            PREFIX + "request_stage_time_seconds",
            "Seconds per finished request and stage (queue, text_encode, denoise, decode, mp4)",
            ["model_name", "stage"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self._step_cache_steps = Counter(
            PREFIX + "step_cache_steps",
            "Denoising steps with the step cache on, by outcome (computed, skipped)",
            ["model_name", "outcome"],
            registry=self.registry,
        )

    def request_ended(self, finished_reason: str) -> None:
        self._request_success.labels(finished_reason, self.model_name).inc()

    def stage_time(self, stage: str, seconds: float) -> None:
        self._stage_time.labels(self.model_name, stage).observe(seconds)

    def step_cache_steps(self, outcome: str, count: int) -> None:
        self._step_cache_steps.labels(self.model_name, outcome).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # The series with only `model_name`, bound to it once.

    def _gauge(self, name: str, documentation: str):
        return Gauge(PREFIX + name, documentation, ["model_name"], registry=self.registry).labels(self.model_name)

    def _counter(self, name: str, documentation: str):
        return Counter(PREFIX + name, documentation, ["model_name"], registry=self.registry).labels(self.model_name)

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]):
        metric = Histogram(PREFIX + name, documentation, ["model_name"], buckets=buckets, registry=self.registry)
        return metric.labels(self.model_name)
