"""`/v1/videos`: the job API in the shape of the OpenAI Videos API (create, retrieve, list, content,
delete), so the official `openai` client works against it. reelserve's own generation fields
(num_frames, fps, steps, guidance, seed, negative_prompt, sampler) are accepted as extensions.
`input_reference` (image-to-video) is a multipart file part, as the SDK sends it, or base64 in JSON."""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict

from serve.api.jobs import JOB_STATUS, Job, JobStore
from serve.api.routes import (
    ConfigDep,
    EngineDep,
    LimitsDep,
    ParsedBody,
    SpecDep,
    parse_body,
    request_body_docs,
    resolve_request,
)
from serve.api.schemas import GenerateRequest

videos_router = APIRouter(prefix="/v1/videos", tags=["videos"])
# Clients poll; the openai SDK reads this header for its interval.
POLL_AFTER_MS = "500"


class VideoCreateRequest(GenerateRequest):
    """OpenAI's fields (`model`, `seconds`, `size`) plus every `POST /generate` field."""

    model_config = ConfigDict(extra="forbid", strict=False, use_attribute_docstrings=True)

    model: str | None = None
    """The served model's name (this server serves one); absent means that one."""
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


def get_jobs(request: Request) -> JobStore:
    return request.app.state.jobs


def get_model_name(request: Request) -> str:
    return request.app.state.model_name


JobsDep = Annotated[JobStore, Depends(get_jobs)]
ModelNameDep = Annotated[str, Depends(get_model_name)]


def openai_error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
    """OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _field_error(field: str, message: str, value: object) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message, "input": value}])


def to_generate_request(body: VideoCreateRequest, model_name: str, spec, limits) -> GenerateRequest:
    """Map OpenAI's `seconds`/`size` onto reelserve's fields; explicit fields win."""
    if body.model is not None and body.model != model_name:
        raise _field_error("model", f"model must be {model_name!r} (the model this server serves)", body.model)
    fields = body.model_dump(exclude={"model", "seconds", "size"}, exclude_unset=True)
    if body.size is not None and not {"width", "height"} & fields.keys():
        match = re.fullmatch(r"(\d+)x(\d+)", body.size)
        if match is None:
            raise _field_error("size", "size must be WIDTHxHEIGHT, e.g. 1280x720", body.size)
        fields["width"], fields["height"] = int(match[1]), int(match[2])
    if body.seconds is not None and "num_frames" not in fields:
        fields["num_frames"] = _frames_for(body.seconds, fields.get("fps") or spec.defaults["fps"], limits)
    return GenerateRequest(**fields)


def _frames_for(seconds: object, fps: int, limits) -> int:
    try:
        value = float(seconds)
    except ValueError:
        raise _field_error("seconds", 'seconds must be a number, e.g. "4"', seconds) from None
    longest = (limits.max_num_frames - 1) / fps
    if not 0 < value <= longest:
        raise _field_error("seconds", f"seconds must be > 0 and <= {longest:g} at {fps} fps (server limit)", seconds)
    return round(value * fps) + 1


def video_object(job: Job, engine, adjustments: tuple[str, ...] = ()) -> VideoObject:
    state = engine.request_state(job.id) if not job.done else None
    if state is not None:
        job.status, job.progress = JOB_STATUS[state["status"]], state["progress"]
    p = job.params
    return VideoObject(
        id=job.id,
        model=job.model,
        status=job.status,
        progress=job.progress,
        created_at=job.created_at,
        completed_at=job.completed_at,
        expires_at=job.expires_at,
        prompt=p.prompt,
        seconds=f"{p.num_frames / p.fps:g}",
        size=f"{p.width}x{p.height}",
        error=job.error,
        queue_position=None if state is None else state["queue_position"],
        eta_seconds=None if state is None or state["eta_s"] is None else round(state["eta_s"], 2),
        adjustments=list(adjustments) or None,
    )


def _json(video: VideoObject, status: int = 200) -> JSONResponse:
    headers = {"openai-poll-after-ms": POLL_AFTER_MS}
    if video.adjustments:
        headers["X-Reelserve-Adjusted"] = "; ".join(video.adjustments)
    return JSONResponse(video.model_dump(), status_code=status, headers=headers)


async def parse_create_body(request: Request, limits: LimitsDep) -> ParsedBody[VideoCreateRequest]:
    """JSON, or multipart/form-data as the openai SDK sends it (all values strings, coerced here;
    `input_reference` a file part)."""
    return await parse_body(request, VideoCreateRequest, limits)


CreateBodyDep = Annotated[ParsedBody[VideoCreateRequest], Depends(parse_create_body)]


@videos_router.post("", openapi_extra=request_body_docs("VideoCreateRequest"))
def create_video(
    body: CreateBodyDep, engine: EngineDep, jobs: JobsDep, spec: SpecDep, config: ConfigDep, model: ModelNameDep
) -> JSONResponse:
    """Queue a generation; poll `GET /v1/videos/{id}`, then download `/content`. (A sync handler:
    FastAPI runs it in a thread, so decoding an `input_reference` does not block the event loop.)"""
    fields = to_generate_request(body.fields, model, spec, config.limits)
    resolved = resolve_request(fields, spec, config, body.image)
    request_id, future = engine.submit(resolved.params)
    # The job keeps its params for as long as it is listed; the image went to the engine with the
    # request and is not kept here (nor ever shown: VideoObject has no field for it).
    stored = dataclasses.replace(resolved.params, image=None)
    return _json(video_object(jobs.add(request_id, model, stored, future), engine, resolved.adjustments))


@videos_router.get("")
def list_videos(
    engine: EngineDep,
    jobs: JobsDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
) -> JSONResponse:
    page, more = jobs.list(after, limit, descending=order == "desc")
    data = [video_object(j, engine).model_dump() for j in page]
    last = data[-1]["id"] if data else None
    first = data[0]["id"] if data else None
    return JSONResponse({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more})


@videos_router.get("/{video_id}")
def retrieve_video(video_id: str, engine: EngineDep, jobs: JobsDep) -> JSONResponse:
    job = jobs.get(video_id)
    if job is None:
        return _not_found(video_id)
    return _json(video_object(job, engine))


@videos_router.get("/{video_id}/content")
def download_video(video_id: str, engine: EngineDep, jobs: JobsDep, variant: Literal["video"] = "video"):
    job = jobs.get(video_id)
    if job is None:
        return _not_found(video_id)
    if job.status != "completed":
        return openai_error(409, f"video {video_id} is {video_object(job, engine).status}, not completed", "conflict")
    if job.path is None or not job.path.is_file():
        return openai_error(410, f"video {video_id} has expired and was deleted", "gone")
    return FileResponse(job.path, media_type="video/mp4", filename=f"{video_id}.mp4")


@videos_router.delete("/{video_id}")
def delete_video(video_id: str, engine: EngineDep, jobs: JobsDep) -> JSONResponse:
    """Cancel the job if it is still running (at its next step) and delete its video."""
    if jobs.get(video_id) is None:
        return _not_found(video_id)
    engine.cancel(video_id)
    jobs.delete(video_id)
    return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})


def _not_found(video_id: str) -> JSONResponse:
    return openai_error(404, f"no video with id {video_id!r}", "invalid_request_error", param="video_id")
