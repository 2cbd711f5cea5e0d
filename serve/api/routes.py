"""Routers: one per resource. Handlers validate, enqueue, and answer; they never run model code."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from models.wan.spec import WanSpec
from serve.api.params import ResolvedRequest, resolve
from serve.api.schemas import ErrorResponse, GenerateRequest, HealthResponse
from serve.config import Limits, ServerConfig
from serve.engine.client import EngineClient, GenerationResult


def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine


def get_spec(request: Request) -> WanSpec:
    return request.app.state.spec


def get_limits(request: Request) -> Limits:
    return request.app.state.limits


def get_config(request: Request) -> ServerConfig:
    return request.app.state.config


EngineDep = Annotated[EngineClient, Depends(get_engine)]
SpecDep = Annotated[WanSpec, Depends(get_spec)]
LimitsDep = Annotated[Limits, Depends(get_limits)]
ConfigDep = Annotated[ServerConfig, Depends(get_config)]


def resolve_request(body: GenerateRequest, spec: WanSpec, config: ServerConfig) -> ResolvedRequest:
    return resolve(body, spec, config.limits, config.default_preset, config.lora_dirs)


# The stages the worker reports, in pipeline order; Server-Timing lists them in this order.
STAGES = ("queue", "text_encode", "denoise", "decode", "mp4")

generate_router = APIRouter(tags=["generate"])
health_router = APIRouter(tags=["health"])


@generate_router.post(
    "/generate",
    response_class=Response,
    responses={
        200: {"content": {"video/mp4": {}}, "description": "The video"},
        429: {"model": ErrorResponse, "description": "Queue full; see Retry-After"},
        500: {"model": ErrorResponse, "description": "The worker failed this request"},
        503: {"model": ErrorResponse, "description": "The engine or its worker is down"},
    },
)
async def generate(
    body: GenerateRequest, request: Request, engine: EngineDep, spec: SpecDep, config: ConfigDep
) -> Response:
    """Generate one video and return it as `video/mp4`. A client that disconnects cancels it."""
    start = time.perf_counter()
    resolved = resolve_request(body, spec, config)
    result = await until_disconnected(request, engine.generate(resolved.params))
    if result is None:
        return Response(status_code=499)  # nobody is listening; the request was cancelled
    headers = video_headers(resolved, result, total_s=time.perf_counter() - start)
    return Response(result.mp4, media_type="video/mp4", headers=headers)


async def until_disconnected(request: Request, work: Awaitable[GenerationResult]) -> GenerationResult | None:
    """Await `work` unless the client goes away first; then cancel it (the engine drops the
    request at its next step boundary) and return None. The body is already read, so the next
    ASGI message is the disconnect (the way vLLM listens for it; `is_disconnected` polls)."""
    task = asyncio.ensure_future(work)
    disconnect = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait([task, disconnect], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        disconnect.cancel()
        return task.result()
    task.cancel()
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def video_headers(resolved: ResolvedRequest, result: GenerationResult, total_s: float) -> dict[str, str]:
    headers = {
        "X-Reelserve-Seed": str(resolved.params.seed),
        "X-Reelserve-Request-Id": result.request_id,
        "X-Reelserve-Worker": ",".join(sorted({str(worker) for _, worker, _ in result.trace})),
        "Server-Timing": server_timing({**result.timings, "total": total_s}),
        "Content-Disposition": f'inline; filename="{result.request_id}.mp4"',
    }
    if resolved.adjustments:
        headers["X-Reelserve-Adjusted"] = "; ".join(resolved.adjustments)
    return headers


def server_timing(timings: dict[str, float]) -> str:
    """W3C Server-Timing: `name;dur=<ms>`, pipeline stages first, then anything else."""
    names = [n for n in STAGES if n in timings] + [n for n in timings if n not in STAGES]
    return ", ".join(f"{name};dur={timings[name] * 1000:.1f}" for name in names)


@health_router.get(
    "/health",
    response_model=HealthResponse,
    response_model_exclude_none=True,
    responses={503: {"model": HealthResponse}},
)
def health(engine: EngineDep) -> HealthResponse | JSONResponse:
    """200 while the engine loop and its worker are alive; 503 (with the reason) otherwise."""
    if engine.is_healthy():
        return HealthResponse(status="ok")
    body = HealthResponse(status="unavailable", reason=engine.health_reason())
    return JSONResponse(body.model_dump(exclude_none=True), status_code=503)


@health_router.get(
    "/ready",
    response_model=HealthResponse,
    response_model_exclude_none=True,
    responses={503: {"model": HealthResponse}},
)
def ready(engine: EngineDep) -> HealthResponse | JSONResponse:
    """200 only once every worker has loaded the model and run its warmup; 503 before (and while down)."""
    if engine.is_ready():
        return HealthResponse(status="ok")
    body = HealthResponse(status="unavailable", reason=engine.health_reason() or "warming up")
    return JSONResponse(body.model_dump(exclude_none=True), status_code=503)


@health_router.get("/metrics", response_class=PlainTextResponse)
def metrics(engine: EngineDep) -> PlainTextResponse:
    """Prometheus text format: queue depth, running requests, outcomes, step and stage latencies."""
    return PlainTextResponse(engine.metrics(), media_type="text/plain; version=0.0.4")
