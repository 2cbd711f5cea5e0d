"""The jobs part of the config tree: which job store and artifact store, and how claims expire."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from serve.frozen import FrozenConfig, flag

# Container platforms pass these as environment (REELSERVE_JOB_STORE, REELSERVE_ARTIFACTS, ...):
# `reelserve serve` reads every setting from REELSERVE_* variables (serve/settings_file.py).


class JobsConfig(FrozenConfig):
    """Job records, the work queue and stored videos."""

    job_store: str = "sqlite"
    """`sqlite` (default: `jobs.sqlite3` in the output directory, one replica) or `redis://HOST:PORT/DB`
    (shared by every replica; env `REELSERVE_JOB_STORE`)."""
    artifacts: str | None = None
    """Where MP4s and uploaded images are kept: a directory (default: the output directory) or
    `s3://BUCKET/PREFIX` (env `REELSERVE_ARTIFACTS`; credentials from boto3's usual AWS_* variables)."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint, e.g. `http://127.0.0.1:8333` (env `REELSERVE_S3_ENDPOINT_URL`); none: AWS."""
    presigned_urls: bool = False
    """With S3 artifacts, `GET /v1/videos/{id}/content` redirects to a presigned URL instead of streaming."""
    presign_ttl_s: int = Field(900, ge=1, le=7 * 24 * 3600)
    """How long a presigned download URL stays valid."""
    webhook_urls: tuple[str, ...] = Field((), json_schema_extra=flag("--webhook-url"))
    """Where `video.completed` and `video.failed` events go (repeat for several): Standard Webhooks,
    signed with `--webhook-secret`, retried with backoff. Only these URLs are ever called."""
    webhook_secret: str | None = Field(None, repr=False)
    """The webhooks' signing secret (`whsec_...` as OpenAI's, or any string; env
    `REELSERVE_WEBHOOK_SECRET`); receivers verify with `client.webhooks.unwrap(..., secret=...)`."""
    webhook_attempts: int = Field(6, ge=1, le=20)
    """Tries per webhook delivery (1 s, 2 s, 4 s, ... apart) before it is given up and logged."""
    claim_idle_s: float = Field(60.0, gt=0)
    """A running job whose replica has not refreshed its claim for this long is taken over by another."""

    @field_validator("job_store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value != "sqlite" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"job store {value!r}: use sqlite (the default) or redis://HOST:PORT/DB")
        return value

    @model_validator(mode="after")
    def _replicas_share_their_files_too(self) -> JobsConfig:
        """A job created on one replica may run on another and be downloaded from a third: with a
        shared job store, a per-host directory would lose its images and videos."""
        if self.shared and not (self.artifacts or "").startswith("s3://"):
            raise ValueError(
                "with a shared --job-store the replicas must share their files too: "
                "pass --artifacts s3://BUCKET/PREFIX (and --s3-endpoint-url for a non-AWS server)"
            )
        return self

    @model_validator(mode="after")
    def _webhooks_are_signed_http(self) -> JobsConfig:
        for url in self.webhook_urls:
            if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
                raise ValueError(f"--webhook-url {url!r} is not an http(s) URL")
        if self.webhook_urls and not self.webhook_secret:
            raise ValueError("--webhook-url needs --webhook-secret (or REELSERVE_WEBHOOK_SECRET): events are signed")
        return self

    @property
    def shared(self) -> bool:
        """Whether several replicas may share this store (Redis) or one process owns it (SQLite)."""
        return self.job_store != "sqlite"
