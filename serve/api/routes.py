"""Routers: one per resource. Handlers validate, enqueue, and answer; they never run model code."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from decimal import Decimal
from typing import Annotated, Generic, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from models.wan.spec import WanSpec
from serve.api.errors import error_responses, redact
from serve.api.form_fields import form_fields
from serve.api.images import FIELD as IMAGE_FIELD
from serve.api.images import ImageInputError, base64_chars
from serve.api.params import ResolvedRequest, resolve
from serve.api.schemas import GenerateRequest, HealthResponse
from serve.config import Limits, ServerConfig
from serve.engine.client import EngineClient, EngineUnavailable, GenerationFailed, GenerationResult


# The dependencies are async: they only read app state, and a sync dependency costs a thread-pool
# round trip per request (under a burst that queue decides who reaches admission first).
async def get_engine(request: Request) -> EngineClient:
    return request.app.state.engine


async def get_spec(request: Request) -> WanSpec:
    return request.app.state.spec


async def get_limits(request: Request) -> Limits:
    return request.app.state.limits


async def get_config(request: Request) -> ServerConfig:
    return request.app.state.config


EngineDep = Annotated[EngineClient, Depends(get_engine)]
SpecDep = Annotated[WanSpec, Depends(get_spec)]
LimitsDep = Annotated[Limits, Depends(get_limits)]
ConfigDep = Annotated[ServerConfig, Depends(get_config)]


def resolve_request(
    body: GenerateRequest, spec: WanSpec, config: ServerConfig, image: bytes | None = None
) -> ResolvedRequest:
    """Validate and fill `body`; an `input_reference` (uploaded `image`, or base64 in `body`) is
    decoded and fitted here, so call it off the event loop (a large image takes a CPU-second)."""
    return resolve(body, spec, config.limits, config.sampling.preset, config.lora.dirs, image=image)


Model = TypeVar("Model", bound=BaseModel)
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


@dataclass(frozen=True)
class ParsedBody(Generic[Model]):
    fields: Model
    image: bytes | None = None
    """The raw bytes of an `input_reference` uploaded as a multipart file part."""


async def parse_body(request: Request, model: type[Model], limits: Limits) -> ParsedBody[Model]:
    """A JSON body, or multipart/form-data as the openai SDK sends it: text parts are coerced from
    strings, and `input_reference` may be a file part. Errors are 422s shaped like FastAPI's."""
    image = None
    if request.headers.get("content-type", "").startswith(FORM_TYPES):
        # A text part may carry the image as base64: allow that much, not Starlette's 1 MiB default.
        try:
            form = await request.form(max_part_size=base64_chars(limits.max_image_bytes) + 1024)
        except HTTPException as e:  # Starlette's 400 for a form it cannot parse: a body error, as bad JSON is
            error = {"type": "form_invalid", "loc": ("body",), "msg": f"the form cannot be read: {e.detail}"}
            raise RequestValidationError([{**error, "input": None}]) from None
        texts: list[tuple[str, str]] = []
        try:
            for key, value in form.multi_items():
                if isinstance(value, str):
                    texts.append((key, value))
                elif key != IMAGE_FIELD:
                    raise _field_error(key, f"{key} cannot be a file; only {IMAGE_FIELD} can", value.filename)
                elif image is not None:
                    raise _field_error(key, f"{key} is given more than once", None)
                else:
                    image = await _read_upload(value, limits)
        finally:
            await form.close()
        # Repeated keys, `loras[][name]` parts and JSON-text `loras` (serve/api/form_fields.py).
        data: object = form_fields(texts, model)
        if image is not None and IMAGE_FIELD in data:
            raise _field_error(IMAGE_FIELD, f"{IMAGE_FIELD} is given more than once", None)
        strict = False  # every form value is a string
        if flags := _form_flag_errors(data, model):
            raise RequestValidationError(flags)
    else:
        try:
            data = parse_json(await request.body())
        except json.JSONDecodeError as e:  # FastAPI's own shape for a body it cannot decode
            error = {"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error", "input": {}}
            raise RequestValidationError([{**error, "ctx": {"error": e.msg}}]) from None
        except ValueError:
            error = {"type": "json_invalid", "loc": ("body",), "msg": "the body must be JSON or multipart/form-data"}
            raise RequestValidationError([{**error, "input": None}]) from None
        strict = None  # the model's own setting
    if unfit := unfit_values(data):
        raise RequestValidationError(unfit)
    try:
        return ParsedBody(model.model_validate(data, strict=strict), image)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in errors]) from None


class NonFinite(str):
    """A JSON number that is not a finite float (`NaN`, `Infinity`, or `1e309`, which overflows),
    kept as the text the client sent so the 422 can name it. Python's json takes these; JSON
    itself has no such numbers, and a NaN that gets past parsing makes a black video or a 500."""


class TooLong(str):
    """A JSON integer with more digits than Python reads (`sys.get_int_max_str_digits`): no field
    takes it, and int() would raise instead of naming the field."""


def parse_json(body: bytes) -> object:
    def parse_int(text: str) -> int | TooLong:
        return int(text) if len(text) <= sys.get_int_max_str_digits() else TooLong(text)

    def parse_float(text: str) -> float | int | NonFinite:
        value = float(text)
        if not math.isfinite(value):
            return NonFinite(text)
        # JSON Schema calls 64.0 an integer, and so does this server (exactly: 9007199254740993.0
        # is not rounded through a float).
        return int(Decimal(text)) if value.is_integer() else value

    return json.loads(body, parse_constant=NonFinite, parse_float=parse_float, parse_int=parse_int)


def unfit_values(data: object, loc: tuple = ("body",)) -> list[dict]:
    """422 items for every value no field may hold, wherever it sits in the body: a non-finite
    number, or text with a NUL or an unpaired surrogate (valid JSON escapes, but no tokenizer,
    path or store takes them: one in a prompt used to fail every request of its text-encode batch)."""
    if isinstance(data, NonFinite):
        return [_unfit(loc, "finite_number", f"{_name(loc)} must be a finite number, not {data}")]
    if isinstance(data, TooLong):
        return [_unfit(loc, "too_long", f"{_name(loc)} is a number of {len(data)} digits; no field takes one so long")]
    if isinstance(data, str):
        problem = _text_problem(data)
        return [_unfit(loc, "string_unfit", f"{_name(loc)} {problem}")] if problem else []
    if isinstance(data, dict):
        errors = []
        for key, value in data.items():
            if problem := _text_problem(key):  # the key would be echoed in the error's loc
                errors.append(_unfit(loc, "string_unfit", f"a field name in {_name(loc)} {problem}"))
            else:
                errors += unfit_values(value, (*loc, key))
        return errors
    if isinstance(data, list):
        return [e for i, value in enumerate(data) for e in unfit_values(value, (*loc, i))]
    return []


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "must not contain a NUL character (U+0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must not contain an unpaired UTF-16 surrogate (U+D800..U+DFFF); send valid Unicode text"
    return None


def _name(loc: tuple) -> str:
    return ".".join(str(part) for part in loc[1:]) or "the body"


def _unfit(loc: tuple, kind: str, message: str) -> dict:
    return {"type": kind, "loc": loc, "msg": message, "input": None}


def _form_flag_errors(data: dict, model: type[BaseModel]) -> list[dict]:
    """A boolean form field is `true` or `false`: lax validation would also read 0, "off" or "n",
    which the schema (a boolean) does not allow."""
    errors = []
    for name, field in model.model_fields.items():
        if field.annotation is bool and name in data and data[name] not in ("true", "false"):
            errors.append(_unfit(("body", name), "bool_parsing", f"{name} must be true or false"))
    return errors


async def _read_upload(upload: UploadFile, limits: Limits) -> bytes:
    if upload.size is not None and upload.size > limits.max_image_bytes:  # before reading it back
        raise ImageInputError(
            f"{IMAGE_FIELD} is {upload.size} bytes; it must be at most {limits.max_image_bytes} bytes "
            "(server limit max_image_bytes)",
            "too_long",
            limits.max_image_bytes,
        ).error()
    return await upload.read()


def _field_error(field: str, message: str, value: object) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message, "input": value}])


async def parse_generate_body(request: Request, limits: LimitsDep) -> ParsedBody[GenerateRequest]:
    return await parse_body(request, GenerateRequest, limits)


def request_body_docs(schema: str) -> dict:
    """OpenAPI for a body parsed by `parse_body` (FastAPI sees no body parameter to document);
    app.py adds the named schema to the components."""
    content = {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}},
        "multipart/form-data": {"schema": {"$ref": f"#/components/schemas/{schema}Form"}},  # see openapi.form_schema
    }
    return {"requestBody": {"required": True, "content": content}}


# The stages the worker reports, in pipeline order; Server-Timing lists them in this order.
STAGES = ("queue", "text_encode", "denoise", "decode", "mp4")

generate_router = APIRouter(tags=["generate"])
health_router = APIRouter(tags=["health"])


@generate_router.post(
    "/generate",
    response_class=Response,
    responses={
        200: {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}, "description": "The video"},
        **error_responses(413, 422, 429, 500, 503, openai=False),
        499: {"description": "Never received: the client went away, so its request was cancelled"},
    },
    openapi_extra=request_body_docs("GenerateRequest"),
)
async def generate(
    body: Annotated[ParsedBody[GenerateRequest], Depends(parse_generate_body)],
    request: Request,
    engine: EngineDep,
    spec: SpecDep,
    config: ConfigDep,
) -> Response:
    """Generate one video and return it as `video/mp4`. A client that disconnects cancels it.
    JSON, or multipart/form-data with `input_reference` as a file part."""
    start = time.perf_counter()
    resolved = await run_in_threadpool(resolve_request, body.fields, spec, config, body.image)
    if request.app.state.jobs.runner.draining:
        raise EngineUnavailable("the server is shutting down")
    with request.app.state.admission.place():
        future = engine.enqueue(resolved.params)
    result = await until_disconnected(request, asyncio.wrap_future(future))
    if result is None:
        return Response(status_code=499)  # nobody is listening; the request was cancelled
    headers = video_headers(resolved, result, total_s=time.perf_counter() - start)
    return scratch_response(result, headers)


def scratch_response(result: GenerationResult, headers: dict[str, str]) -> Response:
    """The MP4 the worker wrote to scratch, streamed from there and deleted once sent."""
    chunks = result.store.stream(result.artifact)
    if chunks is None:
        raise GenerationFailed(result.request_id, "the finished video went missing from the scratch directory")
    size = result.store.size(result.artifact)
    if size is not None:
        headers = {**headers, "Content-Length": str(size)}
    cleanup = BackgroundTask(result.store.delete, result.artifact)
    return StreamingResponse(chunks, media_type="video/mp4", headers=headers, background=cleanup)


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
    body = HealthResponse(status="unavailable", reason=redact(engine.health_reason() or ""))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=503)


@health_router.get(
    "/ready",
    response_model=HealthResponse,
    response_model_exclude_none=True,
    responses={503: {"model": HealthResponse}},
)
def ready(engine: EngineDep, request: Request) -> HealthResponse | JSONResponse:
    """200 only once every worker has loaded the model and run its warmup, and while this replica
    takes work; 503 before, while down, while a worker restarts (naming it; /health stays 200
    while another serves), while draining after SIGTERM or while the artifact store cannot be
    written."""
    problem = request.app.state.jobs.ready_problem
    if engine.is_ready() and problem is None:
        return HealthResponse(status="ok")
    reason = problem or engine.health_reason() or engine.core.unready_reason() or "warming up"
    body = HealthResponse(status="unavailable", reason=redact(reason))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=503)


@health_router.get("/metrics", response_class=PlainTextResponse)
def metrics(engine: EngineDep) -> PlainTextResponse:
    """Prometheus text format: queue depth, running requests, outcomes, step and stage latencies."""
    return PlainTextResponse(engine.metrics(), media_type="text/plain; version=0.0.4")
