"""Routers: one per resource. Handlers validate, enqueue, and answer; they never run model code."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from models.wan.spec import WanSpec
from serve.api.params import ResolvedRequest, resolve
from serve.api.schemas import ErrorResponse, GenerateRequest, HealthResponse
from serve.config import Limits
from serve.engine.client import EngineClient, GenerationResult


def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine


def get_spec(request: Request) -> WanSpec:
    return request.app.state.spec


def get_limits(request: Request) -> Limits:
    return request.app.state.limits


EngineDep = Annotated[EngineClient, Depends(get_engine)]
SpecDep = Annotated[WanSpec, Depends(get_spec)]
LimitsDep = Annotated[Limits, Depends(get_limits)]

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
async def generate(body: GenerateRequest, engine: EngineDep, spec: SpecDep, limits: LimitsDep) -> Response:
    """Generate one video and return it as `video/mp4`."""
    start = time.perf_counter()
    resolved = resolve(body, spec, limits)
    result = await engine.generate(resolved.params)
    headers = video_headers(resolved, result, total_s=time.perf_counter() - start)
    return Response(result.mp4, media_type="video/mp4", headers=headers)


def video_headers(resolved: ResolvedRequest, result: GenerationResult, total_s: float) -> dict[str, str]:
    headers = {
        "X-Reelserve-Seed": str(resolved.params.seed),
        "X-Reelserve-Request-Id": result.request_id,
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
