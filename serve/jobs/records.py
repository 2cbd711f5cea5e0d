"""A job's record as every store keeps it: plain JSON-able fields, so SQLite rows and Redis hashes
hold the same thing, and any replica can rebuild the request from it (same params, same seed,
same video)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from serve.engine.request import ConditionImage, GenerationParams

QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = "queued", "in_progress", "completed", "failed", "cancelled"
DONE = (COMPLETED, FAILED, CANCELLED)


def video_key(job_id: str) -> str:
    """The artifact key of a job's MP4."""
    return f"videos/{job_id}.mp4"


def image_key(job_id: str) -> str:
    """The artifact key of a job's conditioning image (raw RGB; its size is in the record)."""
    return f"inputs/{job_id}.rgb"


@dataclass
class JobRecord:
    id: str
    model: str
    params: GenerationParams
    """Without the image: that is an artifact (`image_key`), its size in `image_size`."""
    created_at: float
    status: str = QUEUED
    progress: int = 0
    completed_at: float | None = None
    expires_at: float | None = None
    error: dict[str, str] | None = None
    """{"code", "message"} of a failed job."""
    artifact: str | None = None
    """The MP4's key in the artifact store, once completed."""
    image_size: tuple[int, int] | None = None
    """(width, height) of the stored conditioning image, when the request had one."""
    owner: str | None = None
    """The replica running it (claims), or None while queued."""
    attempts: int = 0
    """How many times a replica claimed it (a takeover or a restart claims again)."""
    tenant: str | None = None
    """Who created it, with API keys on (a hash of the key): only that caller sees it."""
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status in DONE

    def to_json(self) -> str:
        fields = dataclasses.asdict(self) | {"params": params_to_dict(self.params)}
        return json.dumps(fields, allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> JobRecord:
        fields = json.loads(text)
        fields["params"] = params_from_dict(fields["params"])
        if fields.get("image_size") is not None:
            fields["image_size"] = tuple(fields["image_size"])
        return cls(**fields)


def params_to_dict(params: GenerationParams) -> dict:
    fields = dataclasses.asdict(dataclasses.replace(params, image=None))
    fields.pop("image")
    fields["loras"] = [list(lora) for lora in params.loras]
    return fields


def params_from_dict(fields: dict) -> GenerationParams:
    fields = dict(fields)
    fields["loras"] = tuple((str(name), float(scale)) for name, scale in fields.get("loras", ()))
    return GenerationParams(**fields)


def with_image(params: GenerationParams, size: tuple[int, int] | None, rgb: bytes | None) -> GenerationParams:
    """The params a worker needs: the stored image put back (None when the request had none)."""
    if size is None or rgb is None:
        return params
    return dataclasses.replace(params, image=ConditionImage(size[0], size[1], rgb))
