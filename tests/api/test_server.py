import sys

import uvicorn

from serve.api.server import run_server
from serve.config import ServerConfig


def test_run_server_serves_the_app_on_the_configured_address(tiny_model_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    run_server(ServerConfig(model_dir=tiny_model_dir, host="0.0.0.0", port=8123))
    [(app, kwargs)] = calls
    assert {"/generate", "/health"} <= set(app.openapi()["paths"])
    assert (kwargs["host"], kwargs["port"]) == ("0.0.0.0", 8123)


def test_the_http_process_imports_no_torch():
    """The API and engine loop only enqueue and wait; torch belongs in the worker process."""
    import subprocess

    code = "import sys, serve.api.server, serve.engine.client; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
