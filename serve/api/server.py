"""`reelserve serve`: run the app under uvicorn, and shut down without losing work on SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

import uvicorn

from models.registry import resolve
from serve.api.access import with_header_timeout
from serve.api.app import create_app
from serve.api.jobs import JobService, open_job_service
from serve.config import ServerConfig
from serve.engine.client import EngineClient
from serve.engine.executor import WorkerStartError
from serve.jobs.artifacts import ArtifactStoreError
from serve.jobs.store import StoreUnavailable
from serve.logs import configure_logging, startup_summary

log = logging.getLogger(__name__)
DRAIN_POLL_S = 0.1
# After the drain, how long uvicorn waits for open responses (a video still streaming) to finish.
SHUTDOWN_GRACE_S = 30


class ServerStartError(RuntimeError):
    """The model could not be loaded or the stores cannot be written; the message names the file
    (or store) and the fix."""


class DrainingServer(uvicorn.Server):
    """uvicorn, except that SIGTERM first drains: `/ready` turns 503 and new work gets 503 with
    Retry-After while the running work finishes, for up to `shutdown_timeout_s`; then uvicorn
    shuts down as usual. A second signal (or SIGINT) stops at once; what still runs then goes back
    to the job store, queued, either way."""

    def __init__(
        self,
        config: uvicorn.Config,
        jobs: JobService,
        engine: EngineClient,
        timeout_s: float,
        summary: Callable[[str], str] | None = None,
    ) -> None:
        super().__init__(config)
        self.jobs, self.engine, self.timeout_s = jobs, engine, timeout_s
        self.summary = summary
        self._draining: threading.Thread | None = None

    async def startup(self, sockets=None) -> None:
        """Once the port is bound (the model loaded before), say what is served and where."""
        await super().startup(sockets)
        if self.started and self.summary is not None:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            log.info(self.summary(f"http://{f'[{host}]' if ':' in host else host}:{port}"))

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and self._draining is not None:  # a second SIGTERM: stop now
            self.force_exit = True
        if sig != signal.SIGTERM or self._draining is not None:
            super().handle_exit(sig, frame)
            return
        log.info("SIGTERM: draining running work for up to %.0f s", self.timeout_s)
        self.jobs.runner.draining = True
        self._draining = threading.Thread(target=self._drain_then_exit, daemon=True)
        self._draining.start()

    def _drain_then_exit(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not self._idle() and time.monotonic() < deadline:
            time.sleep(DRAIN_POLL_S)
        if not self._idle():
            # Out of time: what still runs fails as unavailable (jobs go back to the store, queued;
            # a `POST /generate` gets a 503), so no open request holds the process past the deadline.
            log.info("drain timed out: the rest stays queued")
            self.engine.fail_all("the server is shutting down")
        else:
            log.info("drain complete; shutting down")
        # should_exit, not handle_exit: uvicorn re-raises the signals handle_exit captured once it
        # has shut down, and a drained SIGTERM is a clean exit (code 0), not death by signal.
        self.should_exit = True

    def _idle(self) -> bool:
        """No job running here, and no `POST /generate` either (those are not in the job store)."""
        return not self.jobs.runner.running and self.engine.is_idle()


def run_server(config: ServerConfig, client: EngineClient | None = None) -> None:
    """Serve until SIGINT/SIGTERM. One uvicorn process: the engine and its worker live in it, so
    several uvicorn workers would load the model several times. `client`: an engine with another
    runner (tests)."""
    configure_logging(config.log_format, config.log_level)  # first: the engine's INFO events are wanted too
    client = client or EngineClient(config)
    try:
        # The stores first (seconds), then the model (minutes): a server that cannot keep jobs
        # refuses to start before it spends the time to load.
        jobs = open_job_service(config, client, config.model_names[0])
    except (StoreUnavailable, ArtifactStoreError) as e:
        raise ServerStartError(str(e)) from e
    try:
        # Load before binding the port: a broken checkpoint is one clear line, not a lifespan traceback.
        client.start()
    except WorkerStartError as e:
        client.stop()
        jobs.store.close()
        raise ServerStartError(str(e)) from e
    app = create_app(config, client, jobs=jobs)
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            log_config=None,  # uvicorn's loggers go through the root logger configure_logging set up
            http=with_header_timeout(config.access.header_timeout_s),
            timeout_keep_alive=config.access.keep_alive_timeout_s,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        ),
        jobs,
        client,
        config.shutdown_timeout_s,
        summary=lambda url: ready_summary(config, client, url),
    )
    server.run()


def ready_summary(config: ServerConfig, client: EngineClient, url: str) -> str:
    """What an operator checks first: which model, on which devices with which memory plan, within
    which limits, and where."""
    entry = resolve(config.model_dir)
    limits, scheduler = config.limits, config.scheduler
    workers = [_worker_line(w) for w in ready_workers(client)]
    return startup_summary(
        [
            ("model", f"{config.model_names[0]} ({entry.family} {entry.variant}, {config.model_dir})"),
            ("workers", "; ".join(workers)),
            ("quantization", config.quant.policy or _stored_weights(config.memory.weights_dtype)),
            (
                "limits",
                f"{limits.max_width}x{limits.max_height} px, {limits.max_num_frames} frames, "
                f"{limits.max_num_inference_steps} steps, queue {scheduler.max_queue}, "
                f"batch {scheduler.max_batch_size}",
            ),
            ("api keys", "on" if config.access.keys() else "off (open)"),
            ("url", url),
        ]
    )


def ready_workers(client: EngineClient) -> list:
    """The workers that reported Ready (all of them once `start()` returned)."""
    return [w for w in client.core.executor.workers if w.info is not None]


def _stored_weights(weights_dtype: str) -> str:
    # `bf16` is the default "store as loaded" (the worker's --dtype), not a quantization.
    return "none" if weights_dtype == "bf16" else f"weights stored in {weights_dtype}"


def _worker_line(w) -> str:
    """`0: cuda:0 bfloat16, memory resident`; a group: its devices and how they split the work."""
    where = w.info.device
    if w.group is not None:
        where = f"group {','.join(w.group.devices)} (ulysses {w.group.ulysses} x cfg {w.group.cfg})"
    return f"{w.index}: {where} {w.info.dtype}, memory {w.info.memory_plan}"
