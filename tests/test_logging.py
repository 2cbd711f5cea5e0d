"""Logs: `--log-format json` is one object per line from every part of the server (API, engine,
workers, uvicorn), events about a request carry its id, and once the port is bound one INFO event
says what is served, where and within which limits."""

from __future__ import annotations

import json
import logging
import re
import signal
import sys

import httpx

from serve.api.server import _worker_line
from serve.engine.executor import WorkerHandle
from serve.engine.messages import Ready
from serve.logs import JsonFormatter, TextFormatter, about
from serve.worker.factory import WorkerArgs
from serve.worker.group_args import GroupArgs
from tests.jobs.server_process import ServerProcess

SIZE = {"width": 32, "height": 32, "num_frames": 5, "num_inference_steps": 2, "lossless": True}


def record(message: str, extra: dict | None = None, exc_info=None) -> logging.LogRecord:
    logger = logging.getLogger("serve.engine.core")
    return logger.makeRecord(logger.name, logging.INFO, __file__, 1, message, (), exc_info, extra=extra)


def test_json_lines_carry_the_fields_and_the_request_ids():
    entry = json.loads(JsonFormatter().format(record("queued", about("video_1"))))
    assert set(entry) == {"ts", "level", "logger", "message", "request_id"}
    assert (entry["level"], entry["logger"], entry["message"], entry["request_id"]) == (
        "INFO",
        "serve.engine.core",
        "queued",
        "video_1",
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["ts"])  # UTC, ISO 8601
    assert json.loads(JsonFormatter().format(record("batch", about("a", "b"))))["request_ids"] == ["a", "b"]
    assert "request_id" not in json.loads(JsonFormatter().format(record("no request")))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        line = JsonFormatter().format(record("failed", exc_info=sys.exc_info()))
    assert "\n" not in line and "RuntimeError: boom" in json.loads(line)["exc_info"]  # still one line
    assert TextFormatter().format(record("queued", about("video_1"))).endswith("serve.engine.core [video_1]: queued")


def test_a_process_name_and_a_worker_group_in_the_summary():
    """A rank of a worker group names itself in each event; the summary names a group's devices."""
    entry = json.loads(JsonFormatter(process="rank 1").format(record("joined")))
    assert entry["process"] == "rank 1"
    assert " rank 1 serve.engine.core: joined" in TextFormatter(process="rank 1").format(record("joined"))
    group = GroupArgs(devices=("cuda:0", "cuda:1"), ulysses=2, cfg=1)
    handle = WorkerHandle(0, WorkerArgs("m"), info=Ready("cuda:0", "bfloat16", memory_plan="resident"), group=group)
    assert _worker_line(handle) == "0: group cuda:0,cuda:1 (ulysses 2 x cfg 1) bfloat16, memory resident"


def test_a_json_server_logs_its_summary_and_each_request_by_id(tiny_model_dir, tmp_path):
    """A real `reelserve serve` (the fake runner in its worker), with the format given as a
    REELSERVE_* variable: every line it and its worker write is JSON."""
    log = tmp_path / "server.log"
    server = ServerProcess(tiny_model_dir, "--max-queue", "7", env={"REELSERVE_LOG_FORMAT": "json"}, log=log)
    with server:
        with server.client() as http:
            assert http.post("/generate", json={"prompt": "a red square", **SIZE}).status_code == 200
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]  # fails on a non-JSON line
    assert all({"ts", "level", "logger", "message"} <= set(e) for e in entries)

    (summary,) = [e for e in entries if e["message"].startswith("ready: ")]
    assert summary["level"] == "INFO" and summary["logger"] == "serve.api.server"
    for part in (
        f"t2v, {tiny_model_dir.resolve()})",  # the variant, then the folder
        "workers 0: cpu float32, memory resident",
        "limits 1280x1280 px, 129 frames, 100 steps, queue 7, batch 8",
        f"url {server.url}",  # the port actually bound
    ):
        assert part in summary["message"], (part, summary["message"])

    (queued,) = [e for e in entries if e["message"].startswith("queued: 32x32, 5 frames, 2 steps")]
    request_id = queued["request_id"]
    about_it = [e for e in entries if e.get("request_id") == request_id or request_id in e.get("request_ids", [])]
    said = {(e["logger"], e["message"].split(" ")[0]) for e in about_it}
    assert {
        ("serve.engine.core", "queued:"),
        ("serve.engine.core", "started"),
        ("serve.worker.worker", "video"),  # the worker process: stored its MP4
        ("serve.engine.core", "finished"),
    } <= said
    assert any(e["logger"] == "uvicorn.access" and "POST /generate" in e["message"] for e in entries)


def test_text_is_the_default_and_engine_info_is_not_dropped(tiny_model_dir, tmp_path):
    log = tmp_path / "server.log"
    with ServerProcess(tiny_model_dir, log=log) as server:
        httpx.post(f"{server.url}/generate", json={"prompt": "x", **SIZE}, timeout=120)
        server.signal(signal.SIGTERM)
        server.wait()
    text = log.read_text()
    assert re.search(r" INFO serve\.engine\.core \[\S+\]: finished in ", text), text[-2000:]
    assert re.search(r" INFO serve\.api\.server: ready: model ", text)
