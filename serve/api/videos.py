"""`/v1/videos`: the job API in the shape of the OpenAI Videos API (create, retrieve, list, content,
delete), so the official `openai` client works against it. reelserve's own generation fields
(num_frames, fps, steps, guidance, seed, negative_prompt, sampler) are accepted as extensions.
`input_reference` (image-to-video) is a multipart file part, as the SDK sends it, or base64 in JSON."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from serve.api.errors import SafeJSONResponse, error_responses, redact
from serve.api.jobs import JobService
from serve.api.models import model_not_found
from serve.api.openapi import max_seconds, seconds_pattern, size_pattern
from serve.api.routes import (
    ConfigDep,
    LimitsDep,
    ParsedBody,
    SpecDep,
    parse_body,
    request_body_docs,
    resolve_request,
)
from serve.api.schemas import GenerateRequest, OpenAIError
from serve.engine.client import QueueFull
from serve.jobs.artifacts import ArtifactStoreError, cause_of
from serve.jobs.records import COMPLETED, IN_PROGRESS, QUEUED, JobRecord
from serve.jobs.store import StoreUnavailable

logger = logging.getLogger(__name__)
videos_router = APIRouter(prefix="/v1/videos", tags=["videos"])
# Clients poll; the openai SDK reads this header for its interval.
POLL_AFTER_MS = "500"


class VideoCreateRequest(GenerateRequest):
    """OpenAI's fields (`model`, `seconds`, `size`) plus every `POST /generate` field."""

    # Strict like GenerateRequest: a JSON "64" for a height is a 422, as the schema says. Form
    # fields (all text) are validated in lax mode by `parse_body`.
    model_config = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True)

    model: str | None = None
    """One of the names the server serves (`GET /v1/models`); absent means its model. An unknown
    name is a 404 (`model_not_found`), as OpenAI answers one."""
    seconds: str | int | float | None = None
    """Duration; sets num_frames = seconds x fps + 1 (then rounded to 4k+1) unless num_frames is given."""
    size: str | None = None
    """`WIDTHxHEIGHT`, e.g. `1280x720`; sets width and height unless they are given."""


class VideoError(BaseModel):
    code: str
    message: str


class VideoObject(BaseModel):
    id: str
    object: Literal["video"] = "video"
    model: str
    status: str
    progress: int
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    prompt: str
    seconds: str
    size: str
    error: VideoError | None = None
    remixed_from_video_id: None = None
    queue_position: int | None = None
    """Requests ahead of this one in the queue (reelserve extension)."""
    eta_seconds: float | None = None
    """Predicted seconds until denoising ends, from the calibrated cost model (reelserve extension)."""
    adjustments: list[str] | None = None
    """What the server changed in the request, e.g. "height=70->64" or how `input_reference` was
    cropped and resized (reelserve extension; in the create response only, as in the
    `X-Reelserve-Adjusted` header of `POST /generate`)."""


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool


async def get_jobs(request: Request) -> JobService:
    return request.app.state.jobs


async def get_model_names(request: Request) -> tuple[str, ...]:
    return request.app.state.model_names


async def get_tenant(request: Request) -> str | None:
    """The caller, with API keys on (`serve.api.access`); None when the API is open."""
    return getattr(request.state, "tenant", None)


JobsDep = Annotated[JobService, Depends(get_jobs)]
TenantDep = Annotated[str | None, Depends(get_tenant)]
ModelNamesDep = Annotated[tuple[str, ...], Depends(get_model_names)]


RETRY = {"Retry-After": "5"}


def openai_error(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
):
    """OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`."""
    body = {"error": {"message": redact(message), "type": kind, "param": param, "code": code}}
    return SafeJSONResponse(body, status_code=status, headers=headers)


def _field_error(field: str, message: str, value: object) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message, "input": value}])


def to_generate_request(body: VideoCreateRequest, spec, limits) -> GenerateRequest:
    """Map OpenAI's `seconds`/`size` onto reelserve's fields; explicit fields win. `size` and
    `seconds` are checked with the patterns the OpenAPI document states (serve/api/openapi.py),
    even when explicit fields override them, so the schema and the server agree on every body."""
    fields = body.model_dump(exclude={"model", "seconds", "size"}, exclude_unset=True)
    if body.size is not None:
        width, height = _size(body.size, limits)
        if not {"width", "height"} & fields.keys():
            fields["width"], fields["height"] = width, height
    notes = []
    if body.seconds is not None:
        seconds = _seconds(body.seconds, limits)
        if "num_frames" not in fields:
            fps = fields.get("fps") or spec.defaults["fps"]
            fields["num_frames"] = round(seconds * fps) + 1
            if fields["num_frames"] > limits.max_num_frames:  # seconds x fps: over the frame limit
                over = f"seconds={seconds:g} at {fps} fps is over the server limit --max-num-frames"
                notes.append(f"num_frames={fields['num_frames']}->{limits.max_num_frames} ({over})")
                fields["num_frames"] = limits.max_num_frames
    request = GenerateRequest(**fields)
    request._adjustments = tuple(notes)
    return request


def _size(size: str, limits) -> tuple[int, int]:
    if re.fullmatch(size_pattern(limits), size) is None:
        msg = (
            f"size must be WIDTHxHEIGHT, e.g. 1280x720, with width {limits.min_width}..{limits.max_width} "
            f"and height {limits.min_height}..{limits.max_height} (server limits)"
        )
        raise _field_error("size", msg, size)
    width, height = size.split("x")
    return int(width), int(height)


def _seconds(seconds: str | int | float, limits) -> float:
    longest = max_seconds(limits)
    if isinstance(seconds, str):
        ok = re.fullmatch(seconds_pattern(limits), seconds) is not None
    else:
        ok = 0 < seconds <= longest
    if not ok:
        msg = f'seconds must be a number above 0 and at most {longest:g} (server limit), e.g. "4"'
        raise _field_error("seconds", msg, str(seconds))
    return float(seconds)


def video_object(record: JobRecord, jobs: JobService, adjustments: tuple[str, ...] = ()) -> VideoObject:
    """The record as the API shows it; a job running on this replica shows the engine's finer view
    (status, progress, queue position, ETA), one elsewhere the progress its replica last stored."""
    live = jobs.live(record)
    p = record.params
    return VideoObject(
        id=record.id,
        model=record.model,
        status=record.status if live is None else live.status,
        progress=record.progress if live is None else live.progress,
        created_at=int(record.created_at),
        completed_at=None if record.completed_at is None else int(record.completed_at),
        expires_at=None if record.expires_at is None else int(record.expires_at),
        prompt=p.prompt,
        seconds=f"{p.num_frames / p.fps:g}",
        size=f"{p.width}x{p.height}",
        error=None if record.error is None else {k: redact(str(v)) for k, v in record.error.items()},
        queue_position=None if live is None else live.queue_position,
        eta_seconds=None if live is None or live.eta_s is None else round(live.eta_s, 2),
        adjustments=list(adjustments) or None,
    )


def listed_video(record: JobRecord, jobs: JobService) -> dict:
    """One entry of a listing. A record that cannot be shown in full (damaged in the store, or
    written by another version) is shown by id with a `failed` status and an error saying so: one
    bad record must not make the listing a 500 for every client."""
    try:
        return video_object(record, jobs).model_dump()
    except Exception:
        logger.exception("job %s: its record cannot be rendered; listed without its details", record.id)
    error = VideoError(code="unreadable_record", message="this job's record cannot be read; delete it")
    fields = {"model": "", "progress": 0, "created_at": 0, "prompt": "", "seconds": "0", "size": "0x0"}
    return VideoObject(id=str(record.id), status="failed", error=error, **fields).model_dump()


def _json(video: VideoObject, status: int = 200) -> JSONResponse:
    headers = {"openai-poll-after-ms": POLL_AFTER_MS}
    if video.adjustments:
        headers["X-Reelserve-Adjusted"] = "; ".join(video.adjustments)
    return SafeJSONResponse(video.model_dump(), status_code=status, headers=headers)


async def parse_create_body(request: Request, limits: LimitsDep) -> ParsedBody[VideoCreateRequest]:
    """JSON, or multipart/form-data as the openai SDK sends it (all values strings, coerced here;
    `input_reference` a file part)."""
    return await parse_body(request, VideoCreateRequest, limits)


CreateBodyDep = Annotated[ParsedBody[VideoCreateRequest], Depends(parse_create_body)]


@videos_router.post(
    "",
    openapi_extra=request_body_docs("VideoCreateRequest"),
    responses={200: {"model": VideoObject}, **error_responses(404, 413, 422, 429, 500, 503, openai=True)},
)
async def create_video(
    body: CreateBodyDep,
    request: Request,
    jobs: JobsDep,
    spec: SpecDep,
    config: ConfigDep,
    models: ModelNamesDep,
    tenant: TenantDep,
) -> JSONResponse:
    """Store the job and return at once; poll `GET /v1/videos/{id}`, then download `/content`.
    Admitted on the event loop in arrival order, like `POST /generate` (serve/api/admission.py);
    decoding an `input_reference` and writing the record run in the thread pool. `model` may be
    any served name; the job reports the first."""
    if body.fields.model is not None and body.fields.model not in models:
        return model_not_found(body.fields.model)
    fields = to_generate_request(body.fields, spec, config.limits)
    resolved = await run_in_threadpool(resolve_request, fields, spec, config, body.image)
    if jobs.ready_problem is not None:
        return openai_error(503, f"not taking new jobs: {jobs.ready_problem}", "unavailable", headers=RETRY)
    try:
        with request.app.state.admission.place():
            record = await run_in_threadpool(jobs.create, resolved.params, tenant)
    except QueueFull as e:
        headers = {"Retry-After": str(e.retry_after_s)}
        return openai_error(429, str(e), "rate_limit_exceeded", code="queue_full", headers=headers)
    except (StoreUnavailable, ArtifactStoreError) as e:
        logger.error("could not store a job: %s", e)  # the details (paths, hosts) stay in the log
        return openai_error(503, f"the job could not be stored: {cause_of(e)}", "unavailable", headers=RETRY)
    # The record keeps the params without the image (the image is an artifact of its own, never shown).
    return _json(video_object(record, jobs, resolved.adjustments))


@videos_router.get("", responses={200: {"model": VideoList}, **error_responses(422, 500, openai=True)})
def list_videos(
    jobs: JobsDep,
    tenant: TenantDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
) -> JSONResponse:
    page, more = jobs.list(after, limit, order, tenant)
    data = [listed_video(r, jobs) for r in page]
    last = data[-1]["id"] if data else None
    first = data[0]["id"] if data else None
    return SafeJSONResponse({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more})


@videos_router.get("/{video_id}", responses={200: {"model": VideoObject}, **error_responses(404, 500, openai=True)})
def retrieve_video(video_id: str, jobs: JobsDep, tenant: TenantDep) -> JSONResponse:
    record = jobs.get(video_id, tenant)
    if record is None:
        return _not_found(video_id)
    return _json(video_object(record, jobs))


@videos_router.get(
    "/{video_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}, "description": "The MP4"},
        307: {"description": "Redirect to a presigned URL of the MP4 (with --presigned-urls)"},
        **error_responses(410, 422, 500, openai=True),
        404: {"model": OpenAIError, "description": "No such video, or it is not completed (code `video_not_ready`)"},
    },
)
def download_video(video_id: str, jobs: JobsDep, tenant: TenantDep, variant: Literal["video"] = "video"):
    record = jobs.get(video_id, tenant)
    if record is None:
        return _not_found(video_id)
    if record.status != COMPLETED:
        return _no_content_yet(video_id, video_object(record, jobs).status)
    url = jobs.presigned_url(record)
    if url is not None:
        return RedirectResponse(url, status_code=307)
    chunks = jobs.content(record)
    if chunks is None:
        return openai_error(410, f"video {video_id} has expired and was deleted", "gone")
    size = jobs.artifacts.size(record.artifact)
    headers = {"Content-Disposition": f'attachment; filename="{video_id}.mp4"'}
    if size is not None:
        headers["Content-Length"] = str(size)
    return StreamingResponse(chunks, media_type="video/mp4", headers=headers)


@videos_router.delete(
    "/{video_id}", responses={200: {"model": VideoDeleted}, **error_responses(404, 500, openai=True)}
)
def delete_video(video_id: str, jobs: JobsDep, tenant: TenantDep) -> JSONResponse:
    """Cancel the job if it is still running (at its next step, on whichever replica) and delete
    its record and video."""
    if not jobs.delete(video_id, tenant):
        return _not_found(video_id)
    return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})


def _no_content_yet(video_id: str, status: str) -> JSONResponse:
    """A 404, as OpenAI answers a download before completion ("Video is not ready yet"): the
    openai client retries 409 (a lock timeout to it) and 5xx, and a retry cannot make a video
    finish sooner. The caller polls the job (`openai-poll-after-ms`), then downloads."""
    if status in (QUEUED, IN_PROGRESS):
        message = f"video {video_id} is not ready yet ({status}); poll GET /v1/videos/{video_id} until it is completed"
        return openai_error(404, message, "invalid_request_error", param="video_id", code="video_not_ready")
    message = f"video {video_id} is {status}; it has no content (GET /v1/videos/{video_id} shows why)"
    return openai_error(404, message, "invalid_request_error", param="video_id", code=f"video_{status}")


def _not_found(video_id: str) -> JSONResponse:
    return openai_error(404, f"no video with id {video_id!r}", "invalid_request_error", param="video_id")
