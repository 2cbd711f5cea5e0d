"""The app factory: routes, error mapping, and a lifespan that starts and stops the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from models.wan.spec import read_spec
from serve.api.body_limit import BodyLimitMiddleware
from serve.api.jobs import JobStore
from serve.api.routes import generate_router, health_router
from serve.api.schemas import ErrorResponse
from serve.api.videos import videos_router
from serve.config import ServerConfig
from serve.engine.client import EngineClient, EngineUnavailable, GenerationFailed, QueueFull


def create_app(config: ServerConfig, client: EngineClient | None = None) -> FastAPI:
    """Build the app. `client` lets tests pass an engine with a fake runner; it is started and
    stopped by the app's lifespan either way."""
    engine = client or EngineClient(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Blocks until the worker has loaded the model, so the server accepts nothing it cannot serve.
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="reelserve", summary="Text-to-video serving for Wan2.2", lifespan=lifespan)
    app.state.engine = engine
    app.state.spec = read_spec(config.model_dir)  # JSON only: the API process never loads weights
    app.state.limits = config.limits
    app.state.config = config
    app.state.model_name = config.model_dir.name
    app.state.jobs = JobStore(config.output_dir, config.max_stored_videos, config.video_ttl_s)
    app.add_middleware(BodyLimitMiddleware)
    app.include_router(generate_router)
    app.include_router(videos_router)
    app.include_router(health_router)
    add_error_handlers(app)
    return app


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, exc: QueueFull) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)}
        return _error(429, str(exc), "queue_full", headers=headers)

    @app.exception_handler(GenerationFailed)
    async def generation_failed(_: Request, exc: GenerationFailed) -> JSONResponse:
        return _error(500, exc.reason, "generation_failed", request_id=exc.request_id)

    @app.exception_handler(EngineUnavailable)
    async def unavailable(_: Request, exc: EngineUnavailable) -> JSONResponse:
        return _error(503, str(exc), "unavailable", headers={"Retry-After": "5"})


def _error(status: int, detail: str, kind: str, request_id: str | None = None, headers=None) -> JSONResponse:
    body = ErrorResponse(detail=detail, type=kind, request_id=request_id)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)
