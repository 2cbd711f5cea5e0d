"""The API's part of the config tree: who may call it (`AccessConfig`) and how long a connection
may sit idle. Torch-free, like every sub-config."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from serve.frozen import FrozenConfig, flag

# Platforms pass secrets as environment: `reelserve serve` reads the keys from this variable
# (comma-separated) like every setting from its REELSERVE_* variable (serve/settings_file.py).
KEYS_ENV = "REELSERVE_API_KEYS"


class AccessConfig(FrozenConfig):
    """API keys and connection timeouts."""

    api_keys: tuple[str, ...] = Field((), repr=False, json_schema_extra=flag("--api-key", env=KEYS_ENV))
    """A key callers must send as `Authorization: Bearer KEY` (repeat the flag for several; env
    `REELSERVE_API_KEYS`, comma-separated). None: the API is open. With keys, each caller sees and
    deletes only the jobs it created."""
    api_key_file: Path | None = None
    """A file of API keys, one per line (blank lines and `#` comments skipped), read at start."""
    open_metrics: bool = False
    """With API keys: leave `/metrics`, `/docs` and `/openapi.json` open (e.g. for a Prometheus on a
    private network). Without this they need a key like every route but `/health` and `/ready`."""
    header_timeout_s: float = Field(30.0, gt=0)
    """Seconds a client may take to send a request's headers before the connection is closed."""
    body_timeout_s: float = Field(60.0, gt=0)
    """Seconds a client may pause while sending a request body before the connection is closed."""
    keep_alive_timeout_s: float = Field(5.0, gt=0)
    """Seconds an idle keep-alive connection stays open."""

    @model_validator(mode="after")
    def _file_is_readable(self) -> AccessConfig:
        if self.api_key_file is not None:
            self.keys()  # a missing or unreadable file fails at start, naming it
        return self

    def keys(self) -> tuple[str, ...]:
        """Every key: those given (flag, environment or config file) and the key file's."""
        found = list(self.api_keys)
        if self.api_key_file is not None:
            try:
                lines = self.api_key_file.read_text().splitlines()
            except OSError as e:
                raise ValueError(f"cannot read the API key file {self.api_key_file}: {e.strerror or e}") from e
            found += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if any(len(k) < 8 for k in found):
            raise ValueError("an API key is shorter than 8 characters; use long random keys")
        return tuple(found)
