"""Every 4xx/5xx answer is JSON in one shape per API, and no answer names a host path.

- `/v1/*` (the OpenAI-shaped job API): OpenAI's error object,
  `{"error": {"message", "type", "param", "code"}}`, so the official client raises its typed errors.
- everything else (`/generate`, the probes): `{"detail", "type", "request_id"?}`, where `detail` is
  a sentence, except on a 422, where it is FastAPI's list of `{"loc", "msg", "type"}` (one per field).

Errors that FastAPI and Starlette raise themselves (404 for an unknown path, 405, a 422 from a
query parameter, any unhandled exception) go through the same renderer as ours, so a client never
meets a plain-text body or an HTML page.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from serve.api.schemas import ErrorResponse, OpenAIError
from serve.jobs.artifacts import ArtifactStoreError, cause_of
from serve.jobs.store import StoreUnavailable

log = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1"

# An absolute filesystem path: a "/" that starts a word (not inside a URL, a MIME type or a
# `lora_down/lora_A` pair), followed by at least one more "/"-separated segment.
_HOST_PATH = re.compile(r"(?<![\w:/.~-])/(?:[^\s/'\"(),;\[\]{}<>]+/)+([^\s/'\"(),;\[\]{}<>]*)")

_SURROGATE = re.compile("[\ud800-\udfff]")

# HTTP status -> (type on /v1/*, type elsewhere), for errors that carry no type of their own.
_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "unauthorized"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("conflict", "conflict"),
    410: ("gone", "gone"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", "invalid_request"),
    429: ("rate_limit_exceeded", "queue_full"),
    503: ("unavailable", "unavailable"),
}


def is_openai_path(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def redact(message: str) -> str:
    """`message` with every absolute host path cut to its last component (a model file, a LoRA
    or a scratch directory is named, never where the server keeps it)."""
    return _HOST_PATH.sub(lambda m: m[1] or "/", message)


def error_kind(status: int, openai: bool) -> str:
    default = ("invalid_request_error", "invalid_request") if status < 500 else ("server_error", "internal_error")
    return _TYPES.get(status, default)[0 if openai else 1]


def error_body(
    path: str,
    status: int,
    message: str,
    kind: str | None = None,
    *,
    param: str | None = None,
    code: str | None = None,
    request_id: str | None = None,
) -> dict:
    """The body of an error answer on `path`; `kind` defaults to the status's usual type."""
    openai = is_openai_path(path)
    kind = kind or error_kind(status, openai)
    message = redact(message)
    if openai:
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    body = {"detail": message, "type": kind}
    return body if request_id is None else {**body, "request_id": request_id}


def error_response(path: str, status: int, message: str, kind: str | None = None, headers=None, **fields):
    return SafeJSONResponse(error_body(path, status, message, kind, **fields), status_code=status, headers=headers)


def field_errors(errors: Sequence[Mapping[str, Any]]) -> list[dict]:
    """FastAPI's 422 items without `input` and `ctx`: they echo what the client sent (NaN, a lone
    surrogate, a megabyte of text), which is what made these answers fail to render before."""
    return [{"loc": list(e["loc"]), "msg": redact(str(e["msg"])), "type": str(e["type"])} for e in errors]


def field_name(loc: Sequence[Any]) -> str:
    """`("body", "loras", 0, "name")` -> `loras.0.name`: the field as OpenAI's `param` names it."""
    parts = loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc
    return ".".join(str(p) for p in parts) or str(loc[0] if loc else "body")


def validation_response(path: str, errors: Sequence[Mapping[str, Any]]) -> JSONResponse:
    items = field_errors(errors)
    if not is_openai_path(path):
        return SafeJSONResponse({"detail": items, "type": "invalid_request"}, status_code=422)
    message = "; ".join(f"{field_name(e['loc'])}: {e['msg']}" for e in items) or "invalid request"
    first = items[0] if items else {"loc": ["body"], "type": "invalid"}
    return error_response(path, 422, message, param=field_name(first["loc"]), code=first["type"])


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on the request's path (GET and DELETE on /v1/videos/{id}),
    asked of the router itself: routes of included routers are nested, not a flat list."""
    routes = request.app.router.routes
    return [
        method
        for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]


class SafeJSONResponse(JSONResponse):
    """A JSONResponse that renders whatever it is given: a string that cannot be UTF-8 (a lone
    surrogate) or a non-finite float would otherwise raise while the answer is being sent, and the
    client would get a bare 500 instead of this answer."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except (ValueError, UnicodeEncodeError):
            return super().render(scrub(content))


def scrub(value: Any) -> Any:
    """`value` made renderable as strict JSON: unpaired surrogates replaced by U+FFFD, NaN and
    infinities by null."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {scrub(str(k)): scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


def add_error_handlers(app: FastAPI) -> None:
    """Route the framework's own errors (and anything unhandled) through `error_response`."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(request.url.path, exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
        headers = exc.headers
        if exc.status_code == 405:  # Starlette names the first route on this path only
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return error_response(request.url.path, exc.status_code, message, headers=headers)

    @app.exception_handler(StoreUnavailable)
    @app.exception_handler(ArtifactStoreError)
    async def store_down(request: Request, exc: Exception) -> JSONResponse:
        # Redis restarting, S3 unreachable, a disk error: a moment's outage, not a bug. The log has
        # the store's name; the client gets the cause and when to retry.
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        message = f"the job store is unavailable ({cause_of(exc)}); retry shortly"
        return error_response(request.url.path, 503, message, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def unhandled(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this handler answers; the client gets no internals.
        return error_response(request.url.path, 500, "internal server error; the server log has the details")


_DESCRIPTIONS = {
    404: "No such resource",
    409: "The video is not completed yet",
    410: "The video has expired and was deleted",
    413: "The request body is over the server's byte limit",
    422: "A field is invalid; the answer names it",
    429: "The queue is full; see Retry-After",
    500: "The request failed on the server (the message says why, without internals)",
    503: "The engine is down, starting or draining; see Retry-After",
}


def error_responses(*statuses: int, openai: bool) -> dict[int | str, dict]:
    """OpenAPI `responses` for these error statuses, each with the body `error_response` sends."""
    model = OpenAIError if openai else ErrorResponse
    return {status: {"model": model, "description": _DESCRIPTIONS[status]} for status in statuses}
