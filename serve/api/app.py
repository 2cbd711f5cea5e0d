"""The app factory: routes, error mapping, and a lifespan that starts and stops the engine."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic.json_schema import models_json_schema

from models.registry import resolve
from models.wan.spec import WanSpec
from serve.api.access import DOCS, PROBES, ApiKeyMiddleware
from serve.api.admission import Admission
from serve.api.body_limit import MAX_BODY_BYTES, BodyLimitMiddleware
from serve.api.errors import add_error_handlers as add_common_error_handlers
from serve.api.errors import error_response, is_openai_path
from serve.api.images import image_body_bytes
from serve.api.jobs import JobService, open_job_service
from serve.api.models import models_router
from serve.api.openapi import state_contract, state_keys
from serve.api.playground import playground_router
from serve.api.routes import generate_router, health_router
from serve.api.schemas import GenerateRequest
from serve.api.videos import VideoCreateRequest, videos_router
from serve.config import ServerConfig
from serve.engine.client import EngineClient, EngineUnavailable, GenerationFailed, QueueFull
from serve.model_source import served_name


def create_app(
    config: ServerConfig,
    client: EngineClient | None = None,
    spec: WanSpec | None = None,
    jobs: JobService | None = None,
) -> FastAPI:
    """Build the app. `client` lets tests pass an engine with a fake runner; it is started and
    stopped by the app's lifespan either way. `spec` replaces the one read from the checkpoint
    (tests serve the tiny text-to-video checkpoint as an image-to-video model with it). `jobs`
    is the job service when the caller opened it already (run_server, to fail before loading)."""
    engine = client or EngineClient(config)
    jobs = jobs or open_job_service(config, engine, config.model_names[0])

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Blocks until the worker has loaded the model, so the server accepts nothing it cannot serve.
        engine.start()
        jobs.start()
        try:
            yield
        finally:
            jobs.stop()  # first: what still runs goes back to the store, not failed by the engine's stop
            engine.stop()

    app = FastAPI(title="reelserve", summary="Text-to-video serving for Wan2.2", lifespan=lifespan)
    app.state.engine = engine
    app.state.spec = spec or resolve(config.model_dir).spec  # JSON only: the API process never loads weights
    app.state.limits = config.limits
    app.state.config = config
    app.state.model_names = config.model_names  # /v1/models; `model` on create may be any of them
    app.state.model_name = config.model_names[0]  # the one jobs report
    app.state.model_root = served_name(config.model_dir)
    app.state.started_at = int(time.time())
    app.state.jobs = jobs
    app.state.admission = Admission(engine, jobs, config.scheduler.max_queue)
    app.add_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES, route_limits=body_limits(app.state.spec, config))
    # Added last, so it runs first: a caller without a key is refused before its body is read.
    access = config.access
    app.add_middleware(
        ApiKeyMiddleware, keys=access.keys(), open_docs=access.open_metrics, body_timeout_s=access.body_timeout_s
    )
    app.include_router(generate_router)
    app.include_router(videos_router)
    app.include_router(models_router)
    app.include_router(health_router)
    app.include_router(playground_router)
    add_error_handlers(app)
    document_bodies(app, GenerateRequest, VideoCreateRequest)
    return app


def body_limits(spec: WanSpec, config: ServerConfig) -> dict[tuple[str, str], int]:
    """Every body is refused over 1 MiB, except on the routes that take an `input_reference` when
    the model takes an image: there base64 in JSON makes the largest image (`max_image_bytes`)
    4/3 its size, and the other fields plus the JSON or multipart framing keep their 1 MiB on top
    (`image_body_bytes`). A text-to-video model takes no image, so its routes stay at 1 MiB."""
    if spec.image_input == "none":
        return {}
    limit = image_body_bytes(config.limits, MAX_BODY_BYTES)
    return {("POST", "/generate"): limit, ("POST", "/v1/videos"): limit}


def document_bodies(app: FastAPI, *models: type) -> None:
    """Add the request models that handlers parse themselves (JSON or multipart, see
    `routes.parse_body`) to the OpenAPI components their `requestBody` docs refer to, with the
    bounds this server enforces written in (`serve.api.openapi.state_contract`)."""
    openapi = app.openapi
    state = app.state  # read now: the schema describes the server as it was built
    served = (state.limits, state.spec, state.model_names, state.config.lora.dirs)
    access = state.config.access
    keyed = bool(access.keys())

    def with_bodies() -> dict:
        if app.openapi_schema is None:
            schema = openapi()
            _, defs = models_json_schema(
                [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs["$defs"])
            state_contract(components, *served)
            if keyed:
                state_keys(schema, PROBES | (DOCS if access.open_metrics else frozenset()))
        return app.openapi_schema

    app.openapi = with_bodies


def add_error_handlers(app: FastAPI) -> None:
    """The engine's errors, in the shape of the API they arrive on (`serve.api.errors`), after the
    handlers for FastAPI's and Starlette's own errors and anything unhandled."""
    add_common_error_handlers(app)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)}
        return error_response(request.url.path, 429, str(exc), code="queue_full", headers=headers)

    @app.exception_handler(GenerationFailed)
    async def generation_failed(request: Request, exc: GenerationFailed) -> JSONResponse:
        kind = None if is_openai_path(request.url.path) else "generation_failed"
        return error_response(request.url.path, 500, exc.reason, kind, request_id=exc.request_id)

    @app.exception_handler(EngineUnavailable)
    async def unavailable(request: Request, exc: EngineUnavailable) -> JSONResponse:
        return error_response(request.url.path, 503, str(exc), headers={"Retry-After": "5"})
