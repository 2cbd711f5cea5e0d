"""Logging of the server process and its workers: one configuration for every logger (the API's,
the engine's, the workers', uvicorn's), as readable text or as JSON lines for log collectors.

An event about a request carries its id: `log.info("...", extra=about(request_id))`; text shows it
in brackets, JSON as `request_id` (`request_ids` for a batch). Without this module configured the
root logger stays at WARNING and the engine's INFO events are dropped, which is why `reelserve
serve` configures it first thing and each worker process again (spawned processes start bare).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_NAME = "reelserve"  # the handler this module installs, replaced (not duplicated) on a second call


def about(*request_ids: str) -> dict[str, object]:
    """`extra=` for an event about one request or a batch of them."""
    if len(request_ids) == 1:
        return {"request_id": request_ids[0]}
    return {"request_ids": list(request_ids)}


def _ids(record: logging.LogRecord) -> list[str]:
    one = getattr(record, "request_id", None)
    return [one] if one else list(getattr(record, "request_ids", None) or [])


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, and request_id(s)
    when the event is about requests; a traceback goes in `exc_info`, so a line stays one line.
    `process`: which process of the server wrote it, where that is not the logger's business (the
    rank of a worker group)."""

    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.process:
            entry["process"] = self.process
        if getattr(record, "request_id", None):
            entry["request_id"] = record.request_id
        if getattr(record, "request_ids", None):
            entry["request_ids"] = record.request_ids
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The usual line, with the request ids in brackets after the logger name (and the process
    before it, when named)."""

    def __init__(self, process: str | None = None) -> None:
        super().__init__(TEXT_FORMAT.replace("%(name)s", f"{process} %(name)s") if process else TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        ids = _ids(record)
        if not ids:
            return line
        head, sep, message = line.partition(": ")
        return f"{head} [{' '.join(ids)}]{sep}{message}"


def configure_logging(log_format: LogFormat = "text", level: str = "info", process: str | None = None) -> None:
    """Send every logger's events at `level` and above to stderr in `log_format`; `process` names
    the process in each event (`rank 1`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter(process) if log_format == "json" else TextFormatter(process))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # a library's warning is an event too: in JSON, not a bare stderr line


def startup_summary(lines: Iterable[tuple[str, str]]) -> str:
    """`label: value` pairs as one event (a JSON collector keeps it whole)."""
    return "ready: " + "; ".join(f"{label} {value}" for label, value in lines)
